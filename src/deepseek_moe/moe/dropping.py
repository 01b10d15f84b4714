"""Token dropping against a per-group compute budget (DeepSeek-V2 §2.2.4, where a group is a "device").

Each expert group may process at most ``capacity_factor * K * T / G`` token-expert assignments. Over budget,
the assignments with the lowest affinity among those the group receives are dropped. Assignments of protected
sequences are never dropped, but they count toward the budget.

Protected sequences: DeepSeek-V2 exempts about 10% of the training sequences from dropping, so that training
stays consistent with inference (which drops nothing) for them. The exemption is per *sequence*, so one forward
protects the same sequences in every MoE layer: the model draws once (:class:`ProtectedSequences`) and passes
the :class:`ProtectedDraw` to each layer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


def group_budget(capacity_factor: float, n_activated: int, n_tokens: int, n_groups: int) -> int:
    """Assignments one expert group may take: ceil(capacity_factor * K * T / G) (ceil: a perfectly balanced
    batch at capacity 1.0 loses nothing)."""
    return math.ceil(capacity_factor * n_activated * n_tokens / n_groups)


def draw_protected_sequences(n_sequences: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(n_sequences,) bool: each sequence protected independently with probability ``fraction``.

    So the protected share is ``fraction`` in expectation at every batch size; a 1-sequence batch is protected
    with probability ``fraction``, not always (as rounding a count up would make it).
    """
    return torch.rand(n_sequences, generator=generator, device=generator.device) < fraction


class ProtectedDraw(NamedTuple):
    """Which sequences one forward protects from dropping, shared by every MoE layer of that forward.

    A seed rather than a mask: each layer expands it over the batch its dropping covers (under expert
    parallelism every rank's sequences, a count only the layer's dispatcher knows) and takes its own slice, so
    every layer and every rank sees the same set. Expanded on the CPU, so CPU and CUDA runs protect alike.
    """

    seed: int

    @classmethod
    def next(cls, generator: torch.Generator) -> ProtectedDraw:
        """A new draw; advances ``generator`` by one value whatever the batch size."""
        return cls(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item()))

    def sequences(self, n_sequences: int, fraction: float) -> torch.Tensor:
        """(n_sequences,) bool on the CPU: the protected sequences of a batch of ``n_sequences``."""
        return draw_protected_sequences(n_sequences, fraction, torch.Generator().manual_seed(self.seed))


class ProtectedSequences(nn.Module):
    """The model-level source of protected-sequence draws: one :class:`ProtectedDraw` per forward.

    A module (without parameters) so that whatever walks a model finds its generator:
    :func:`deepseek_moe.moe.all_layers.routing_state` saves it for exact resume.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self._generator: torch.Generator | None = None

    @property
    def generator(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return self._generator

    def reset(self) -> None:
        self._generator = None

    def draw(self) -> ProtectedDraw:
        return ProtectedDraw.next(self.generator)


def capacity_keep_mask(affinity_A: torch.Tensor, group_A: torch.Tensor, protected_A: torch.Tensor,
                       budget: int, n_groups: int) -> torch.Tensor:
    """Which assignments survive: per group, protected ones first, then by affinity, the first ``budget``.

    Inputs are flat over assignments A (any order). Returns a bool mask (A,). Vectorised: three stable sorts
    give the order (group, protected first, affinity descending); an assignment's rank within its group
    segment decides.
    """
    order = torch.argsort(affinity_A, descending=True, stable=True)
    order = order[torch.argsort((~protected_A[order]).to(torch.int8), stable=True)]
    order = order[torch.argsort(group_A[order], stable=True)]
    per_group = torch.bincount(group_A, minlength=n_groups)
    segment_start = torch.cumsum(per_group, 0) - per_group
    rank = torch.arange(order.numel(), device=order.device) - segment_start[group_A[order]]
    keep_sorted = (rank < budget) | protected_A[order]
    keep = torch.empty_like(keep_sorted)
    keep[order] = keep_sorted
    return keep
