"""Training-side routing glue: orthogonal expert init, freezing chosen experts (stage 3), load statistics."""

from __future__ import annotations

import torch
from torch import nn

from deepseek_moe.moe.all_layers import moe_layers
from deepseek_moe.train.errors import TrainError


def orthogonal_blocks(n_blocks: int, rows: int, cols: int) -> torch.Tensor:
    """(n_blocks, rows, cols): each block semi-orthogonal (orthonormal rows when rows <= cols, else orthonormal
    columns), and, when all n_blocks * rows rows fit (n_blocks * rows <= cols), every row of every block
    orthogonal to every other: the blocks span mutually orthogonal subspaces. Drawn from the global RNG."""
    if n_blocks * rows <= cols:
        joint = torch.empty(n_blocks * rows, cols)
        nn.init.orthogonal_(joint)
        return joint.view(n_blocks, rows, cols)
    blocks = torch.empty(n_blocks, rows, cols)
    for block in blocks:
        nn.init.orthogonal_(block)
    return blocks


@torch.no_grad()
def orthogonal_init_experts(model: nn.Module) -> None:
    """Orthogonal routed experts, so that they start in different subspaces.

    Each expert's input projections w1, w3 (F, D) get orthonormal rows (for F <= D), and its output projection
    w2 (D, F) orthonormal columns; where the experts' rows fit together (E * F <= D) the E experts' rows (w2:
    columns) are moreover mutually orthogonal, so the experts read (and write) disjoint subspaces of the model
    dimension. Unit gain, as ``nn.init.orthogonal_``.
    """
    for _, moe in moe_layers(model):
        ex = moe.experts
        E, F, D = ex.w1.shape
        for w in (ex.w1, ex.w3):
            w.copy_(orthogonal_blocks(E, F, D))
        ex.w2.copy_(orthogonal_blocks(E, F, D).transpose(1, 2))


class ExpertFreezer:
    """Keeps the listed routed experts of every MoE layer fixed (routing stage 3).

    A gradient hook zeroes their slices of the stacked weights (so they do not count toward the clipped norm),
    and ``restore()`` after each optimizer step undoes what AdamW's momentum and weight decay would still do.
    """

    def __init__(self, model: nn.Module, experts: tuple[int, ...]) -> None:
        self.slices: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.handles = []
        index = torch.tensor(sorted(set(experts)), dtype=torch.long)
        for name, moe in moe_layers(model):
            E = moe.cfg.n_routed_experts
            if len(index) and int(index.max()) >= E:
                raise TrainError(f"routing.frozen_experts ({list(experts)}) names expert {int(index.max())}, but "
                                 f"MoE layer {name} has {E} routed experts (0..{E - 1})")
            # Under expert parallelism this rank holds experts [offset, offset + n): freeze those it holds.
            ex = moe.experts
            held = index[(index >= ex.offset) & (index < ex.offset + ex.n_experts)] - ex.offset
            for w in (ex.w1, ex.w2, ex.w3):
                self.slices.append((w, held, w.detach()[held].clone()))
                self.handles.append(w.register_hook(lambda g, held=held: g.index_fill(0, held, 0.0)))
        self.index = index

    @torch.no_grad()
    def restore(self) -> None:
        for w, held, saved in self.slices:
            w[held] = saved

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def layer_names(model: nn.Module) -> list[str]:
    return [name for name, _ in moe_layers(model)]


def load_summary(counts_LE: torch.Tensor) -> dict[str, float]:
    """Mean over layers of max/mean load and of the coefficient of variation."""
    mean = counts_LE.mean(dim=1).clamp_min(1e-9)
    return {"imbalance": float((counts_LE.max(dim=1).values / mean).mean()),
            "cv": float((counts_LE.std(dim=1, unbiased=False) / mean).mean())}


def dropped_fraction(model: nn.Module) -> float:
    stats = [moe.last_stats for _, moe in moe_layers(model) if moe.last_stats is not None]
    total = sum(s.n_assignments for s in stats)
    return sum(float(s.dropped) for s in stats) / total if total else 0.0


__all__ = ["ExpertFreezer", "dropped_fraction", "layer_names", "load_summary", "orthogonal_blocks",
           "orthogonal_init_experts"]
