"""Frozen bf16 weights multiplied in fp32: a base held in bf16 under fp32 activations (LoRA on a bf16 base).

Where torch's bf16 matmul is not native (CPUs without AVX512-BF16 or AMX) it runs a generic loop many times
slower than MKL's fp32 GEMM, forward and backward alike. A frozen base needs its matrices only to be read, so it
can keep them in bf16 (half the memory) while its activations, its adapters and every product run in fp32: each
product widens its weight for the call. The backward widens the weight again for dx instead of keeping the fp32
copy alive from forward to backward, which would hold the fp32 model's memory after all. A frozen weight gets no
gradient, so there is nothing else to compute.

:func:`widens` says when a product takes this path: fp32 activations, a bf16 or fp16 weight that wants no
gradient and has no compute copy (nn/compute_copy.py: the other direction, fp32 masters computed in bf16).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from deepseek_moe.nn.compute_copy import compute_dtype

NARROW = (torch.bfloat16, torch.float16)


def widens(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x`` (fp32, autocast off) times the frozen low-precision ``weight`` is computed by widening the
    weight."""
    return (x.dtype == torch.float32 and weight.dtype in NARROW and not weight.requires_grad
            and compute_dtype(x) == torch.float32)


class _WidenedLinear(torch.autograd.Function):
    """``F.linear(x, w.float(), b)``, saving ``w`` as it is stored."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return dy @ weight.to(dy.dtype), None, None


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` in x's dtype for a frozen ``weight`` (and ``bias``) stored narrower."""
    if bias is not None and bias.requires_grad:
        raise ValueError("widened_linear: a bias that wants a gradient beside a frozen narrow weight")
    return _WidenedLinear.apply(x, weight, bias)


# (x_AN, w_EMN, counts_E) -> (A, M), as moe/experts.py's GroupedProduct
Product = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _WidenedGrouped(torch.autograd.Function):
    """``product(x, w.float(), counts)``; the backward's dx is ``product(dy, w[e] transposed)``."""

    @staticmethod
    def forward(ctx, x_AN: torch.Tensor, w_EMN: torch.Tensor, counts_E: torch.Tensor,
                product: Product) -> torch.Tensor:
        ctx.save_for_backward(w_EMN, counts_E)
        ctx.product = product
        return product(x_AN, w_EMN.to(x_AN.dtype), counts_E)

    @staticmethod
    def backward(ctx, dy_AM: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        w_EMN, counts_E = ctx.saved_tensors
        w_ENM = w_EMN.to(dy_AM.dtype).transpose(1, 2).contiguous()
        return ctx.product(dy_AM.contiguous(), w_ENM, counts_E), None, None, None


def widened_grouped(x_AN: torch.Tensor, w_EMN: torch.Tensor, counts_E: torch.Tensor, product: Product) -> torch.Tensor:
    """The experts' grouped ``product`` of fp32 rows with frozen stacked weights stored narrower."""
    return _WidenedGrouped.apply(x_AN, w_EMN, counts_E, product)


__all__ = ["NARROW", "widened_grouped", "widened_linear", "widens"]
