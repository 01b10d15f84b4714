"""Training-side routing glue: orthogonal expert init, freezing chosen experts (stage 3), load statistics."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from deepseek_moe.model.init import ShardOf, draw_seed, fill, whole
from deepseek_moe.moe.all_layers import moe_layers
from deepseek_moe.train.errors import TrainError


def orthogonal_blocks(n_blocks: int, rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n_blocks, rows, cols): each block semi-orthogonal (orthonormal rows when rows <= cols, else orthonormal
    columns), and, when all n_blocks * rows rows fit (n_blocks * rows <= cols), every row of every block
    orthogonal to every other: the blocks span mutually orthogonal subspaces. Drawn from ``generator`` (default
    the global one)."""
    if n_blocks * rows <= cols:
        joint = torch.empty(n_blocks * rows, cols)
        nn.init.orthogonal_(joint, generator=generator)
        return joint.view(n_blocks, rows, cols)
    blocks = torch.empty(n_blocks, rows, cols)
    for block in blocks:
        nn.init.orthogonal_(block, generator=generator)
    return blocks


def _orthogonal(n_experts: int, transpose: bool) -> Callable[[tuple[int, ...], torch.Generator], torch.Tensor]:
    """A ``model.init.fill`` draw: all experts jointly (E, F, D) when their rows fit together, else one expert's
    (F, D) block (the fill is per expert then); ``transpose`` gives w2's (D, F) layout."""
    def draw(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
        F, D = (shape[-1], shape[-2]) if transpose else (shape[-2], shape[-1])
        w = orthogonal_blocks(n_experts if len(shape) == 3 else 1, F, D, g)
        w = w.transpose(1, 2) if transpose else w
        return w if len(shape) == 3 else w[0]
    return draw


@torch.no_grad()
def orthogonal_init_experts(model: nn.Module, seed: int | None = None, shard_of: ShardOf = whole) -> None:
    """Orthogonal routed experts, so that they start in different subspaces.

    Each expert's input projections w1, w3 (F, D) get orthonormal rows (for F <= D), and its output projection
    w2 (D, F) orthonormal columns; where the experts' rows fit together (E * F <= D) the E experts' rows (w2:
    columns) are moreover mutually orthogonal, so the experts read (and write) disjoint subspaces of the model
    dimension. Unit gain, as ``nn.init.orthogonal_``.

    Deterministic per parameter (``model.init``): from ``seed`` (default the model's ``init_seed``, else one draw
    of the global generator) and the weight's name, each expert alone where the experts are not joint, so a
    sharded model initialises its own experts (``shard_of``) exactly as the single-process model does.
    """
    if seed is None:
        seed = getattr(model, "init_seed", None)
        seed = draw_seed() if seed is None else seed
    for name, moe in moe_layers(model):
        ex = moe.experts
        E, F, D = ex.w1.shape  # the global shape, also when the experts are sharded
        joint = E * F <= D
        prefix = f"orthogonal/{name}.experts." if name else "orthogonal/experts."
        for w in ("w1", "w3", "w2"):
            fill(getattr(ex, w), prefix + w, seed, _orthogonal(E, transpose=w == "w2"), per_expert=not joint,
                 shard_of=shard_of)


class ExpertFreezer:
    """Keeps the listed routed experts of every MoE layer fixed (routing stage 3).

    Their gradient rows are zeroed (so they do not count toward the clipped norm): by a gradient hook on a plain
    weight, by :meth:`zero_grads` (call it after backward, before clipping) on a sharded one, whose gradient
    arrives by reduce-scatter rather than through a hook. ``restore()`` after each optimizer step undoes what
    AdamW's momentum and weight decay would still do. ``shard_of`` (``model.init``) gives each weight's local
    rows: a rank freezes the listed experts it holds.
    """

    def __init__(self, model: nn.Module, experts: tuple[int, ...], shard_of: ShardOf = whole) -> None:
        self.shard_of = shard_of
        self.slices: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.handles = []
        index = torch.tensor(sorted(set(experts)), dtype=torch.long)
        for name, moe in moe_layers(model):
            E = moe.cfg.n_routed_experts
            if len(index) and int(index.max()) >= E:
                raise TrainError(f"routing.frozen_experts ({list(experts)}) names expert {int(index.max())}, but "
                                 f"MoE layer {name} has {E} routed experts (0..{E - 1})")
            ex = moe.experts
            for w in (ex.w1, ex.w2, ex.w3):
                local, offset = shard_of(w)
                first = offset[0]
                held = index[(index >= first) & (index < first + local.shape[0])] - first
                self.slices.append((w, held, local.detach()[held].clone()))
                if local is w:
                    self.handles.append(w.register_hook(lambda g, held=held: g.index_fill(0, held, 0.0)))
        self.index = index

    @torch.no_grad()
    def zero_grads(self) -> None:
        for w, held, _ in self.slices:
            if w.grad is not None:
                self.shard_of(w.grad)[0].index_fill_(0, held, 0.0)

    @torch.no_grad()
    def restore(self) -> None:
        for w, held, saved in self.slices:
            self.shard_of(w)[0][held] = saved

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


def drop_counts(model: nn.Module) -> torch.Tensor:
    """(2,) float64: assignments dropped and assignments made in the last forward of every MoE layer of this
    process (summed over processes, the global batch's; the fraction is their ratio)."""
    stats = [moe.last_stats for _, moe in moe_layers(model) if moe.last_stats is not None]
    return torch.tensor([sum(float(s.dropped) for s in stats), sum(s.n_assignments for s in stats)],
                        dtype=torch.float64)


def traffic_counts(model: nn.Module) -> torch.Tensor | None:
    """(3,) float64: all-to-all bytes sent to other processes (dispatch + combine), (token, process) rows sent
    and tokens dispatched, summed over the MoE layers since :func:`reset_traffic`; None when no layer dispatches
    over processes. Summed over processes: bytes / tokens is the traffic per token per layer, rows / tokens the
    processes a token reaches."""
    stats = [moe.dispatcher.stats for _, moe in moe_layers(model) if hasattr(moe.dispatcher, "stats")]
    if not stats:
        return None
    return torch.tensor([sum(s.dispatch_bytes + s.combine_bytes for s in stats), sum(s.rows_sent for s in stats),
                         sum(s.tokens for s in stats)], dtype=torch.float64)


def reset_traffic(model: nn.Module) -> None:
    for _, moe in moe_layers(model):
        reset = getattr(moe.dispatcher, "reset_stats", None)
        if reset is not None:
            reset()


def dropped_fraction(model: nn.Module) -> float:
    stats = [moe.last_stats for _, moe in moe_layers(model) if moe.last_stats is not None]
    total = sum(s.n_assignments for s in stats)
    return sum(float(s.dropped) for s in stats) / total if total else 0.0


__all__ = ["ExpertFreezer", "drop_counts", "dropped_fraction", "reset_traffic", "traffic_counts", "layer_names", "load_summary", "orthogonal_blocks",
           "orthogonal_init_experts"]
