"""The published balance recipe for fine-tuning a loaded checkpoint, decided from its routing config.

A Hugging Face config.json says how a model routes but not how it was trained; fine-tuning with our generic
defaults would change the recipe under it. The recipe follows from the routing (not from ``model_type``, which
DeepSeek-V2 and V2-Lite share):

| routing | published recipe |
|---|---|
| sigmoid + routing bias (DeepSeek-V3) | auxiliary-loss-free bias, update speed γ 0.001; sequence-wise α 1e-4 |
| device-limited groups (DeepSeek-V2, §2.2.3) | α1 0.003, α2 0.05, α3 0.02; token dropping at capacity 1.0 |
| no group limit (V2-Lite, DeepSeekMoE 16B) | expert-level α1 0.001 only; no dropping |

The presets state the same values (tests/unit/test_recipe.py checks that they agree).
"""

from __future__ import annotations

from typing import Any

from deepseek_moe.config import MoEConfig


def published_recipe(moe: MoEConfig) -> dict[str, Any]:
    """The MoEConfig balance fields of the published recipe that fits ``moe``'s routing."""
    off = {"expert_loss_alpha": 0.0, "device_loss_alpha": 0.0, "comm_loss_alpha": 0.0, "seq_loss_alpha": 0.0,
           "capacity_factor": None}
    if moe.use_routing_bias:
        return {**off, "seq_loss_alpha": 1e-4, "bias_update_speed": 0.001}
    if moe.group_limited:
        return {**off, "expert_loss_alpha": 0.003, "device_loss_alpha": 0.05, "comm_loss_alpha": 0.02,
                "capacity_factor": 1.0}
    return {**off, "expert_loss_alpha": 0.001}


def with_published_recipe(moe: MoEConfig) -> MoEConfig:
    return moe.replace(**published_recipe(moe))


__all__ = ["published_recipe", "with_published_recipe"]
