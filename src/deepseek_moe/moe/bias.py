"""Auxiliary-loss-free load balancing (DeepSeek-V3 §2.1.2): the per-expert routing bias and its update."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from deepseek_moe.moe.all_layers import moe_layers


@torch.no_grad()
def update_routing_bias(model: nn.Module, *, all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
    """After each optimizer step, move each expert's bias by γ toward balance (down when overloaded, up when
    underloaded), from the selection counts of all micro-batches since the last call, then reset the counts.

    Layers in the uniform-routing warm-up are left alone: their routes are random draws, not the router's, so
    they neither count (the layer does not accumulate them) nor move the bias.
    ``all_reduce`` (in place, sum), when given, makes the counts global over a data/expert-parallel group.
    """
    for _, moe in moe_layers(model):
        bias = moe.gate.e_score_correction_bias
        if bias is None or moe.uniform_routing:
            continue
        counts = moe.bias_counts
        if all_reduce is not None:
            all_reduce(counts)
        bias += moe.cfg.bias_update_speed * torch.sign(counts.mean() - counts)
        counts.zero_()


__all__ = ["update_routing_bias"]
