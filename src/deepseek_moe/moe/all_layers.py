"""What a training loop calls on any module that contains MoE layers (a model of ours or of the user's)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from deepseek_moe.moe.layer import MoE


def moe_layers(model: nn.Module) -> Iterator[tuple[str, MoE]]:
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            yield name, module


def collect_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the balance losses the last forward left in every MoE layer of ``model`` (0-dim)."""
    losses = [moe.aux_loss for _, moe in moe_layers(model)]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.to(losses[0].device) for loss in losses]).sum()


@torch.no_grad()
def update_routing_bias(model: nn.Module, *, all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): after each optimizer step, move each expert's bias
    by γ toward balance (down when overloaded, up when underloaded), from the selection counts of all
    micro-batches since the last call, then reset the counts.

    ``all_reduce`` (in place, sum), when given, makes the counts global over a data/expert-parallel group.
    """
    for _, moe in moe_layers(model):
        bias = moe.gate.e_score_correction_bias
        if bias is None:
            continue
        counts = moe.bias_counts
        if all_reduce is not None:
            all_reduce(counts)
        bias += moe.cfg.bias_update_speed * torch.sign(counts.mean() - counts)
        counts.zero_()


def set_uniform_routing(model: nn.Module, enabled: bool) -> None:
    """Switch the uniform-routing warm-up on or off in every MoE layer."""
    for _, moe in moe_layers(model):
        moe.uniform_routing = enabled


def routing_state(model: nn.Module) -> dict[str, Any]:
    """What exact resume needs beyond the state_dict: each layer's generator state, mode and pending counts."""
    state: dict[str, Any] = {}
    for name, moe in moe_layers(model):
        gen = moe._generator
        state[name] = {
            "generator": None if gen is None else gen.get_state(),
            "generator_device": None if gen is None else str(gen.device),
            "uniform_routing": moe.uniform_routing,
            "bias_counts": moe.bias_counts.detach().cpu().clone(),
        }
    return state


def load_routing_state(model: nn.Module, state: dict[str, Any]) -> None:
    layers = dict(moe_layers(model))
    if set(layers) != set(state):
        raise ValueError(f"routing state is for MoE layers {sorted(state)}, the model has {sorted(layers)}")
    for name, moe in layers.items():
        entry = state[name]
        moe.uniform_routing = bool(entry["uniform_routing"])
        moe.bias_counts.copy_(entry["bias_counts"])
        if entry["generator"] is not None:
            moe.generator(torch.device(entry["generator_device"])).set_state(entry["generator"])
