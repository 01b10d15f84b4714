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


def _slabs(n_rows: int, width: int) -> range:
    return range(0, n_rows, max(1, SLAB_ELEMENTS // max(width, 1)))


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits_NV: torch.Tensor, targets_N: torch.Tensor, ignore_index: int,
                mean: bool) -> torch.Tensor:
        N, V = logits_NV.shape
        step = max(1, SLAB_ELEMENTS // max(V, 1))
        acc = torch.promote_types(logits_NV.dtype, torch.float32)  # bf16 logits: their sums in fp32
        lse_N = torch.empty(N, dtype=acc, device=logits_NV.device)
        for s in _slabs(N, V):
            lse_N[s:s + step] = torch.logsumexp(logits_NV[s:s + step].to(acc), dim=1)
        valid_N = targets_N != ignore_index
        picked_N = logits_NV.gather(1, torch.where(valid_N, targets_N, 0).unsqueeze(1)).squeeze(1).to(acc)
        total = torch.where(valid_N, lse_N - picked_N, 0.0).sum()
        count = valid_N.sum()
        ctx.save_for_backward(logits_NV, targets_N, lse_N, valid_N, count)
        ctx.mean = mean
        loss = total / count if mean else total  # every target ignored: 0 / 0, NaN, as F.cross_entropy gives
        return loss.to(logits_NV.dtype)

    @staticmethod
    def backward(ctx: Any, dloss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        logits_NV, targets_N, lse_N, valid_N, count = ctx.saved_tensors
        N, V = logits_NV.shape
        step = max(1, SLAB_ELEMENTS // max(V, 1))
        acc = lse_N.dtype
        weight_N = valid_N.to(acc) * (dloss.to(acc) / count if ctx.mean else dloss.to(acc))
        rows_N = torch.arange(N, device=logits_NV.device)
        grad_NV = torch.empty_like(logits_NV)
        for s in _slabs(N, V):
            g = grad_NV[s:s + step]
            torch.sub(logits_NV[s:s + step].to(acc), lse_N[s:s + step, None], out=g).exp_()
        safe_N = torch.where(valid_N, targets_N, 0)
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


__all__ = ["cross_entropy"]
