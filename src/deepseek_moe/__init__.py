"""deepseek_moe: DeepSeekMoE in PyTorch — the layer, the language model, training and expert parallelism."""

from deepseek_moe.adapters.pretrained import from_pretrained
from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.infer.generate import GenerateOutput, generate
from deepseek_moe.io import save_pretrained
from deepseek_moe.model.causal_lm import CausalLMOutput, DeepSeekMoEForCausalLM
from deepseek_moe.model.counting import count_parameters, flops_per_token, kv_cache_bytes_per_token
from deepseek_moe.model.kv_cache import KVCache
from deepseek_moe.moe.all_layers import (
    collect_aux_loss,
    load_routing_state,
    routing_state,
    set_uniform_routing,
)
from deepseek_moe.moe.bias import update_routing_bias
from deepseek_moe.moe.layer import MoE
from deepseek_moe.moe.stats import MoEStats
from deepseek_moe.presets import PRESETS, get_preset
from deepseek_moe.viz import plot_routing_heatmap, routing_counts

__all__ = [
    "PRESETS",
    "CausalLMOutput",
    "DeepSeekMoEForCausalLM",
    "GenerateOutput",
    "KVCache",
    "MoE",
    "MoEConfig",
    "MoEStats",
    "ModelConfig",
    "collect_aux_loss",
    "count_parameters",
    "flops_per_token",
    "from_pretrained",
    "generate",
    "get_preset",
    "kv_cache_bytes_per_token",
    "load_routing_state",
    "plot_routing_heatmap",
    "routing_counts",
    "routing_state",
    "save_pretrained",
    "set_uniform_routing",
    "update_routing_bias",
]
