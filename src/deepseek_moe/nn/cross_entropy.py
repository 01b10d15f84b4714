"""Cross-entropy over vocabulary-wide rows of logits, keeping for the backward the logits and one number a row.

Why: ``F.cross_entropy`` is log-softmax then NLL, and autograd keeps the log-softmax output, a second (N, V)
tensor beside the logits; its backward then holds the NLL's (N, V) gradient and log-softmax's (N, V) result at
once. At a V2-Lite vocabulary (102,400) and 512 tokens each is 0.21 GB, and they sit at the step's peak (the
start of the backward, when every kept activation is still alive). This function keeps the logits (which the
model's output holds anyway) and the log-sum-exp of each row, and writes the gradient, softmax minus the one-hot
target, into one new (N, V) tensor, a slab of rows at a time so no other (N, V) temporary exists.

Reference: ``F.cross_entropy`` (tests/unit/test_cross_entropy.py: values and gradients, ignored targets, sum and
mean, every target ignored).
"""

from __future__ import annotations

from typing import Any

import torch

SLAB_ELEMENTS = 1 << 22  # logits per slab of rows (16 MB in fp32): the forward's and backward's temporaries


def _slabs(n_rows: int, width: int) -> list[slice]:
    """Row ranges of about SLAB_ELEMENTS logits each."""
    step = max(1, SLAB_ELEMENTS // max(width, 1))
    return [slice(s, s + step) for s in range(0, n_rows, step)]


def _row_terms(logits_NV: torch.Tensor, targets_N: torch.Tensor, ignore_index: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse (N,), valid (N,) bool, safe targets (N,): 0 where ignored, the summed loss, the valid count), the
    sums in fp32 at least (bf16 logits): what both losses below compute their values and gradients from."""
    N, V = logits_NV.shape
    acc = torch.promote_types(logits_NV.dtype, torch.float32)
    lse_N = torch.empty(N, dtype=acc, device=logits_NV.device)
    for s in _slabs(N, V):
        lse_N[s] = torch.logsumexp(logits_NV[s].to(acc), dim=1)
    valid_N = targets_N != ignore_index
    safe_N = torch.where(valid_N, targets_N, 0)
    picked_N = logits_NV.gather(1, safe_N.unsqueeze(1)).squeeze(1).to(acc)
    return lse_N, valid_N, safe_N, torch.where(valid_N, lse_N - picked_N, 0.0).sum(), valid_N.sum()


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits_NV: torch.Tensor, targets_N: torch.Tensor, ignore_index: int,
                mean: bool) -> torch.Tensor:
        lse_N, valid_N, safe_N, total, count = _row_terms(logits_NV, targets_N, ignore_index)
        ctx.save_for_backward(logits_NV, safe_N, lse_N, valid_N, count)
        ctx.mean = mean
        loss = total / count if mean else total  # every target ignored: 0 / 0, NaN, as F.cross_entropy gives
        return loss.to(logits_NV.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dloss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        logits_NV, safe_N, lse_N, valid_N, count = ctx.saved_tensors
        count = count.clamp(min=1)  # every target ignored: a NaN loss (as torch) but zero gradients (as torch)
        N, V = logits_NV.shape
        acc = lse_N.dtype
        weight_N = valid_N.to(acc) * (dloss.to(acc) / count if ctx.mean else dloss.to(acc))
        rows_N = torch.arange(N, device=logits_NV.device)
        grad_NV = torch.empty_like(logits_NV)
        for s in _slabs(N, V):
            torch.sub(logits_NV[s].to(acc), lse_N[s, None], out=grad_NV[s]).exp_()
        grad_NV[rows_N, safe_N] -= valid_N.to(grad_NV.dtype)
        grad_NV.mul_(weight_N.to(grad_NV.dtype).unsqueeze(1))
        return grad_NV, None, None, None


def cross_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(logits_NV, targets_N, ignore_index=..., reduction=...)`` for ``reduction`` "mean" or
    "sum", with less memory kept for the backward (see the module's docstring). logits (N, V), targets (N,)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"cross_entropy: reduction must be 'mean' or 'sum', not {reduction!r}")
    if logits_NV.dim() != 2 or targets_N.shape != logits_NV.shape[:1]:
        raise ValueError(f"cross_entropy: logits (N, V) and targets (N,) expected, got {tuple(logits_NV.shape)} "
                         f"and {tuple(targets_N.shape)}")
    return _CrossEntropy.apply(logits_NV, targets_N, ignore_index, reduction == "mean")


# Rows of a frozen head (vocabulary entries) per slice of the fused loss's gradient: the (N, slice) softmax block
# (8 MB at 512 tokens) and, for int8 codes, the transposed kernel's L2-sized call (kernels/quant_transposed.py).
HEAD_SLICE_ROWS = 4096


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """The mean cross-entropy of ``head(hidden)`` whose gradient in ``hidden`` is computed in the forward, a slice
    of the vocabulary at a time: (softmax - one-hot)[:, slice] @ W[slice] summed, W read through the head's
    ``input_grad_rows``. The backward only scales it: the loss is linear in its upstream gradient. Kept: that
    (N, D) gradient, not the (N, V) logits; no (N, V) gradient ever exists."""

    @staticmethod
    def forward(ctx: Any, hidden_ND: torch.Tensor, targets_N: torch.Tensor, ignore_index: int, head: Any,
                logits_NV: torch.Tensor) -> torch.Tensor:
        N, V = logits_NV.shape  # fp32 logits (head_cross_entropy widens them)
        lse_N, valid_N, safe_N, total, count = _row_terms(logits_NV, targets_N, ignore_index)
        loss = total / count  # all ignored: NaN, as torch gives
        weight_N = valid_N.float().unsqueeze(1)
        d_hidden = torch.zeros(N, hidden_ND.shape[1], dtype=torch.float32, device=hidden_ND.device)
        for v0 in range(0, V, HEAD_SLICE_ROWS):
            rows = slice(v0, min(v0 + HEAD_SLICE_ROWS, V))
            g_Nv = torch.sub(logits_NV[:, rows].float(), lse_N[:, None]).exp_()
            hit_N = valid_N & (safe_N >= rows.start) & (safe_N < rows.stop)
            g_Nv[hit_N, safe_N[hit_N] - rows.start] -= 1.0
            d_hidden += head.input_grad_rows(g_Nv.mul_(weight_N), rows).float()
        ctx.save_for_backward(d_hidden, count)
        ctx.dtype = hidden_ND.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # d_hidden is a constant here: no second derivative
    def backward(ctx: Any, dloss: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        d_hidden, count = ctx.saved_tensors
        return (d_hidden * (dloss.float() / count.clamp(min=1))).to(ctx.dtype), None, None, None, None


def head_cross_entropy(head: torch.nn.Module, hidden_ND: torch.Tensor, targets_N: torch.Tensor,
                       ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V) fp32, the mean cross-entropy of ``head(hidden)``) as :func:`cross_entropy` gives them. A
    frozen head whose class defines ``input_grad_rows(dy (N, v), rows) -> (N, D)`` (dy @ W[rows]: QuantLinear,
    Linear) under a gradient to ``hidden`` takes the fused path, whose backward keeps neither the logits
    nor an (N, V) gradient (0.42 GB at the start of a V2-Lite LoRA step's backward, its peak); the logits come
    back without a graph. Else ``head`` then :func:`cross_entropy`."""
    # input_grad_rows of the head's own class: a subclass that changes what the layer applies (an unmerged LoRA
    # pair) would inherit one that leaves its change out.
    # Not for a sharded head (FSDP2): its weight is a DTensor shard again by the time the slices read it.
    fused = (torch.is_grad_enabled() and hidden_ND.requires_grad and "input_grad_rows" in type(head).__dict__
             and not any(p.requires_grad for p in head.parameters())
             and not any(hasattr(t, "to_local") for t in (*head.parameters(), *head.buffers())))
    if not fused:
        logits_NV = head(hidden_ND).float()
        return logits_NV, cross_entropy(logits_NV, targets_N, ignore_index)
    with torch.no_grad():
        logits_NV = head(hidden_ND).float()
    return logits_NV, _FrozenHeadCrossEntropy.apply(hidden_ND, targets_N, ignore_index, head, logits_NV)


__all__ = ["cross_entropy", "head_cross_entropy"]
