"""Routing statistics a forward leaves behind, computed from counts the layer already has (no extra pass)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MoEStats:
    """tokens_per_expert (E,): assignments each routed expert was chosen for (before dropping);
    dropped: assignments dropped against the capacity budget; n_assignments: T * K; routing_entropy: the mean
    normalised entropy of the tokens' routing distributions (0-dim, :func:`deepseek_moe.moe.balance.
    routing_entropy`), measured in training forwards with learned routing, else None."""

    tokens_per_expert: torch.Tensor
    dropped: torch.Tensor
    n_assignments: int
    routing_entropy: torch.Tensor | None = None

    @property
    def imbalance_max_mean(self) -> float:
        """Load of the busiest expert over the mean load (1.0 is perfectly balanced)."""
        counts = self.tokens_per_expert.float()
        return float(counts.max() / counts.mean().clamp_min(1e-9))

    @property
    def imbalance_cv(self) -> float:
        """Coefficient of variation of the expert loads (0.0 is perfectly balanced)."""
        counts = self.tokens_per_expert.float()
        return float(counts.std(unbiased=False) / counts.mean().clamp_min(1e-9))

    @property
    def dropped_fraction(self) -> float:
        return float(self.dropped) / max(self.n_assignments, 1)
