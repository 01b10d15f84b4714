"""Checkpoint interop: every DeepSeek checkpoint layout (V2/V3, DeepSeekMoE 16B, FP8, our own), streamed in.

``load_pretrained`` builds the model on the meta device and reads each tensor straight into place
(io/streaming.py: the ``LoadHooks`` for selection and per-tensor transforms); ``save_pretrained`` writes the most
widely readable format that expresses the model exactly (io/save.py).
"""

from deepseek_moe.io.hf import config_from_hf, config_to_hf
from deepseek_moe.io.load import load_pretrained, read_config
from deepseek_moe.io.recipe import published_recipe
from deepseek_moe.io.save import checkpoint_format, save_pretrained
from deepseek_moe.io.streaming import CheckpointError, LoadHooks, TensorSource

__all__ = ["CheckpointError", "LoadHooks", "TensorSource", "checkpoint_format", "config_from_hf", "config_to_hf",
           "load_pretrained", "published_recipe", "read_config", "save_pretrained"]
