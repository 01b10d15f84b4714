"""deepseek_moe: DeepSeekMoE in PyTorch."""

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.moe.hooks import (
    collect_aux_loss,
    load_routing_state,
    routing_state,
    set_uniform_routing,
    update_routing_bias,
)
from deepseek_moe.moe.layer import MoE
from deepseek_moe.moe.stats import MoEStats
from deepseek_moe.viz import plot_routing_heatmap, routing_counts

__all__ = [
    "MoE",
    "MoEConfig",
    "MoEStats",
    "ModelConfig",
    "collect_aux_loss",
    "load_routing_state",
    "plot_routing_heatmap",
    "routing_counts",
    "routing_state",
    "set_uniform_routing",
    "update_routing_bias",
]
