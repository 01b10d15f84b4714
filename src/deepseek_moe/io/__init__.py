"""Checkpoint interop: Hugging Face DeepSeek-V2/V3 config translation and safetensors loading/saving."""

from deepseek_moe.io.hf import config_from_hf, config_to_hf
from deepseek_moe.io.safetensors_io import CheckpointError, load_pretrained, save_pretrained

__all__ = ["CheckpointError", "config_from_hf", "config_to_hf", "load_pretrained", "save_pretrained"]
