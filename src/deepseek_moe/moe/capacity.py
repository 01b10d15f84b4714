"""The adaptive capacity factor: each MoE layer's token-dropping budget follows its measured load.

With ``capacity_policy="adaptive"`` a layer starts at ``capacity_factor`` and, after every optimizer step, the
training loop calls :func:`update_capacity` (as it calls the routing-bias update: outside ``forward``):

    c* = the factor at which the step's per-group loads would have dropped ``capacity_target_drop`` of its
         assignments (:func:`capacity_for_drop_rate`, exact for those loads)
    c  ← clip((1 - η) c + η c*, capacity_min, capacity_max),  η = ``capacity_update_rate``

Why this rule: the factor is a compute budget, and the quantity a user can reason about is the drop rate it
buys. Solving for the factor that meets the target on the loads just measured moves c by the right amount in
one step (a sign update, like the routing bias's, needs a step size matched to the load's scale); the moving
average keeps one unusual batch from moving it far; the bounds keep it inside what the user provisioned
(memory, all-to-all buffers). As the router balances, c* falls toward 1 + (target slack) and the factor with
it; when a layer's load spikes, the factor rises within a few steps instead of dropping tokens for the rest of
the run.

Loads are counted before dropping, over all micro-batches of the step and (``all_reduce``) all processes, so
every process computes the same factor. Protected sequences count toward the load like any other (they take
budget) though they are never dropped, so c* slightly overestimates the factor needed; the target drop rate is
a ceiling, not an exact rate. Summing micro-batches averages their imbalance; each micro-batch is dropped
against its own budget.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from deepseek_moe.moe.all_layers import moe_layers


def capacity_for_drop_rate(load_G: torch.Tensor, target_drop: float) -> float:
    """The smallest capacity factor at which groups with these loads drop at most ``target_drop`` of the
    assignments, dropping ignoring protection.

    ``load_G`` (G,): assignments each expert group received (A = Σ_g load_g in all). A group with budget b drops
    max(0, load_g - b); the budget is c A / G (c K T / G with A = K T). Dropped(b) = Σ_g max(0, load_g - b) is
    piecewise linear and decreasing, so b solves Dropped(b) = target·A on the segment between two sorted loads:
    with the k largest loads over b, b = (Σ_{i≤k} load_(i) - target·A) / k. target 0 gives max load / mean load.
    """
    load = torch.sort(load_G.double().flatten(), descending=True).values
    G, total = load.numel(), float(load.sum())
    if total <= 0:
        raise ValueError("capacity_for_drop_rate needs at least one assignment (all loads are zero)")
    allowed = target_drop * total
    prefix = torch.cumsum(load, 0)
    for k in range(1, G + 1):
        budget = (float(prefix[k - 1]) - allowed) / k
        next_load = float(load[k]) if k < G else 0.0
        if budget >= next_load:  # the k largest groups are over this budget, the others within it
            return max(budget, 0.0) * G / total
    return 0.0  # unreachable: at k = G the budget is (1 - target) A / G >= 0 = next_load


@torch.no_grad()
def update_capacity(model: nn.Module, *, all_reduce: Callable[[torch.Tensor], None] | None = None) -> None:
    """After each optimizer step: move every adaptive layer's capacity factor (see the module docstring) from
    the group loads counted since the last call, then reset the counts. Layers in the uniform-routing warm-up,
    and steps that routed nothing through a layer, leave its factor alone. ``all_reduce`` (in place, sum), when
    given, makes the loads global over a data/expert-parallel group."""
    for _, moe in moe_layers(model):
        cfg = moe.cfg
        if cfg.capacity_policy != "adaptive":
            continue
        load = moe.capacity_counts
        if all_reduce is not None:
            all_reduce(load)
        if not moe.uniform_routing and float(load.sum()) > 0:
            target = capacity_for_drop_rate(load, cfg.capacity_target_drop)
            eta = cfg.capacity_update_rate
            new = (1 - eta) * moe.capacity_now + eta * target
            moe.capacity_now = min(max(new, cfg.capacity_min), cfg.capacity_max)
        load.zero_()


def capacity_factors(model: nn.Module) -> list[float]:
    """The capacity factor each MoE layer drops against now (None-free: layers that never drop are left out)."""
    return [moe.capacity_factor for _, moe in moe_layers(model) if moe.capacity_factor is not None]


__all__ = ["capacity_factors", "capacity_for_drop_rate", "update_capacity"]
