"""Token dropping against a per-device compute budget (DeepSeek-V2 §2.2.4).

Each device (expert group) may process at most ``capacity_factor * K * T / D`` token-expert assignments. Over
budget, the assignments with the lowest affinity among those the device receives are dropped. Assignments of
protected sequences are never dropped, but they count toward the budget.
"""

from __future__ import annotations

import math

import torch


def device_budget(capacity_factor: float, n_activated: int, n_tokens: int, n_devices: int) -> int:
    """Assignments one device may take: ceil(capacity_factor * K * T / D) (ceil: a perfectly balanced batch
    at capacity 1.0 loses nothing)."""
    return math.ceil(capacity_factor * n_activated * n_tokens / n_devices)


def choose_protected_sequences(n_sequences: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A bool mask (n_sequences,) marking ceil(fraction * n_sequences) sequences drawn at random."""
    n_protected = math.ceil(fraction * n_sequences)
    order = torch.randperm(n_sequences, generator=generator, device=generator.device)
    mask = torch.zeros(n_sequences, dtype=torch.bool, device=generator.device)
    mask[order[:n_protected]] = True
    return mask


def capacity_keep_mask(affinity_A: torch.Tensor, device_A: torch.Tensor, protected_A: torch.Tensor,
                       budget: int, n_devices: int) -> torch.Tensor:
    """Which assignments survive: per device, protected ones first, then by affinity, the first ``budget``.

    Inputs are flat over assignments A (any order). Returns a bool mask (A,). Vectorised: three stable sorts
    give the order (device, protected first, affinity descending); an assignment's rank within its device
    segment decides.
    """
    order = torch.argsort(affinity_A, descending=True, stable=True)
    order = order[torch.argsort((~protected_A[order]).to(torch.int8), stable=True)]
    order = order[torch.argsort(device_A[order], stable=True)]
    per_device = torch.bincount(device_A, minlength=n_devices)
    segment_start = torch.cumsum(per_device, 0) - per_device
    rank = torch.arange(order.numel(), device=order.device) - segment_start[device_A[order]]
    keep_sorted = (rank < budget) | protected_A[order]
    keep = torch.empty_like(keep_sorted)
    keep[order] = keep_sorted
    return keep
