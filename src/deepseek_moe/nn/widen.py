"""Frozen bf16 weights multiplied in fp32: a base held in bf16 under fp32 activations (LoRA on a bf16 base).

Where torch's bf16 matmul is not native (CPUs without AVX512-BF16 or AMX) it runs a generic loop many times
slower than MKL's fp32 GEMM, forward and backward alike. A frozen base needs its matrices only to be read, so it
can keep them in bf16 (half the memory) while its activations, its adapters and every product run in fp32: each
product widens its weight for the call, a cache-sized piece at a time (a tile of a Linear's rows, one expert of
the routed experts' stack): widening a whole matrix first writes and re-reads its fp32 copy through memory, which
made a bf16 mid-size LoRA step 3.5x the fp32 one; tiled it is ~1.3x. The backward widens the weight again for dx
instead of keeping the fp32 copy alive from forward to backward, which would hold the fp32 model's memory after
all. A frozen weight gets no
gradient, so there is nothing else to compute.

:func:`widens` says when a product takes this path: fp32 activations, a bf16 or fp16 weight that wants no
gradient and has no compute copy (nn/compute_copy.py: the other direction, fp32 masters computed in bf16).
"""

from __future__ import annotations

import torch

from deepseek_moe.nn.compute_copy import compute_dtype

NARROW = (torch.bfloat16, torch.float16)


def widens(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x`` (fp32, autocast off) times the frozen low-precision ``weight`` is computed by widening the
    weight."""
    return (x.dtype == torch.float32 and weight.dtype in NARROW and not weight.requires_grad
            and compute_dtype(x) == torch.float32)


# fp32 elements of W widened at a time (1 MB): a tile stays in cache between its widening and its product.
TILE_ELEMENTS = 1 << 18


def _tile_rows(weight: torch.Tensor) -> int:
    """Rows of ``weight`` widened at a time."""
    return max(1, TILE_ELEMENTS // max(1, weight.shape[1]))


class _WidenedLinear(torch.autograd.Function):
    """``F.linear(x, w.float(), b)`` a tile of W's rows at a time, saving ``w`` as it is stored."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        x2 = x.reshape(-1, x.shape[-1])
        y = x2.new_empty(x2.shape[0], weight.shape[0])
        step = _tile_rows(weight)
        for n0 in range(0, weight.shape[0], step):
            y[:, n0:n0 + step] = x2 @ weight[n0:n0 + step].to(x.dtype).t()
        if bias is not None:
            y += bias.to(x.dtype)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dy2.new_zeros(dy2.shape[0], weight.shape[1])
        step = _tile_rows(weight)
        for n0 in range(0, weight.shape[0], step):
            dx.addmm_(dy2[:, n0:n0 + step], weight[n0:n0 + step].to(dy.dtype))
        return dx.view(*dy.shape[:-1], weight.shape[1]), None, None


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` in x's dtype for a frozen ``weight`` (and ``bias``) stored narrower."""
    if bias is not None and bias.requires_grad:
        raise ValueError("widened_linear: a bias that wants a gradient beside a frozen narrow weight")
    return _WidenedLinear.apply(x, weight, bias)


def _per_expert(x_AN: torch.Tensor, w_EMN: torch.Tensor, counts: list[int], transpose: bool) -> torch.Tensor:
    """Each expert's rows of x times its widened ``w[e]`` transposed (or, ``transpose``, times ``w[e]``): one
    expert's fp32 copy at a time, small enough to stay in cache, where widening the whole stack first wrote and
    re-read it from memory (a bf16 mid-size LoRA step took 3.5x the fp32 one that way)."""
    out = x_AN.new_empty(x_AN.shape[0], w_EMN.shape[2] if transpose else w_EMN.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            w = w_EMN[e].to(x_AN.dtype)
            torch.mm(x_AN[start:start + n], w if transpose else w.t(), out=out[start:start + n])
        start += n
    return out


class _WidenedGrouped(torch.autograd.Function):
    """Each expert's rows times its widened ``w[e]`` transposed; the backward's dx is each expert's rows of dy
    times ``w[e]``."""

    @staticmethod
    def forward(ctx, x_AN: torch.Tensor, w_EMN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w_EMN)
        ctx.counts = counts_E.tolist()
        return _per_expert(x_AN, w_EMN, ctx.counts, transpose=False)

    @staticmethod
    def backward(ctx, dy_AM: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (w_EMN,) = ctx.saved_tensors
        return _per_expert(dy_AM.contiguous(), w_EMN, ctx.counts, transpose=True), None, None


def widened_grouped(x_AN: torch.Tensor, w_EMN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """The experts' grouped product of fp32 rows with frozen stacked weights stored narrower."""
    return _WidenedGrouped.apply(x_AN, w_EMN, counts_E)


__all__ = ["NARROW", "widened_grouped", "widened_linear", "widens"]
