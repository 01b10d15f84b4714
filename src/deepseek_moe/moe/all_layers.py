"""The MoE layers of any module (a model of ours or of the user's), taken together: find them, sum their balance
losses, switch the uniform warm-up, and save or restore their random state. (The routing-bias update, which a
training loop also calls on the whole model, is in :mod:`deepseek_moe.moe.bias`.)"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepseek_moe.moe.dropping import ProtectedSequences
from deepseek_moe.moe.layer import MoE


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(qualified name, layer) of every MoE layer in ``model``, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoE)]


def collect_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the balance losses the last forward left in every MoE layer of ``model`` (0-dim; 0 without any)."""
    losses = [moe.aux_loss for _, moe in moe_layers(model)]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.to(losses[0].device) for loss in losses]).sum()


def set_uniform_routing(model: nn.Module, enabled: bool) -> None:
    """Switch the uniform-routing warm-up on or off in every MoE layer."""
    for _, moe in moe_layers(model):
        moe.uniform_routing = enabled


def set_entropy_scale(model: nn.Module, scale: float) -> None:
    """Scale every MoE layer's routing-entropy regulariser (its schedule: the training loop sets it each step)."""
    for _, moe in moe_layers(model):
        moe.entropy_scale = scale


def _protected_sources(model: nn.Module) -> list[tuple[str, ProtectedSequences]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, ProtectedSequences)]


def routing_state(model: nn.Module) -> dict[str, Any]:
    """What exact resume needs beyond the state_dict: each layer's generator state, mode and pending counts, and
    the generator of each model-level protected-sequence draw (tensors, strings, bools and None only)."""
    state: dict[str, Any] = {}
    for name, moe in moe_layers(model):
        gen = moe._generator
        state[name] = {
            "generator": None if gen is None else gen.get_state(),
            "generator_device": None if gen is None else str(gen.device),
            "uniform_routing": moe.uniform_routing,
            "bias_counts": moe.bias_counts.detach().cpu().clone(),
            "capacity_now": torch.tensor(moe.capacity_now, dtype=torch.float64),
            "capacity_counts": moe.capacity_counts.detach().cpu().clone(),
        }
    for name, source in _protected_sources(model):
        state[name] = {"protected_generator": source.generator.get_state()}
    return state


def load_routing_state(model: nn.Module, state: dict[str, Any]) -> None:
    layers, sources = dict(moe_layers(model)), dict(_protected_sources(model))
    if set(layers) | set(sources) != set(state):
        raise ValueError(f"routing state is for MoE layers and protected-sequence draws {sorted(state)}, the "
                         f"model has {sorted(set(layers) | set(sources))}")
    for name, moe in layers.items():
        entry = state[name]
        moe.uniform_routing = bool(entry["uniform_routing"])
        moe.bias_counts.copy_(entry["bias_counts"])
        if "capacity_now" in entry:  # absent from run directories written before the adaptive capacity factor
            moe.capacity_now = float(entry["capacity_now"])
            moe.capacity_counts.copy_(entry["capacity_counts"])
        if entry["generator"] is not None:
            moe.generator(torch.device(entry["generator_device"])).set_state(entry["generator"])
        else:
            moe._generator = None  # not drawn from yet: created (and seeded) again at the first draw
    for name, source in sources.items():
        source.generator.set_state(state[name]["protected_generator"])


__all__ = ["collect_aux_loss", "load_routing_state", "moe_layers", "routing_state", "set_entropy_scale",
           "set_uniform_routing"]
