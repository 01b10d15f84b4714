"""Frozen quantised weights that pass a gradient to their input: what LoRA on a quantised base trains through.

The weights never train (no gradient reaches codes or scales), but the activation gradient must flow through
every frozen layer to the adapters below it: dx = dy @ W. Autograd through ``quant_matmul``'s tiled path would
keep each dequantised fp32 tile for the backward — the whole model in fp32 by the end of a forward, the memory
the quantisation was meant to save. These functions keep only the codes and scales (already in memory) and
multiply by them again in the backward (kernels/quant_transposed.py: int8 codes widened in registers by the C++
kernel, all experts of a layer in one call; else dequantised tiles); the forward runs the no-grad path (the C++
kernel where there is one).

Shapes: M rows of x, N output rows of W, K its input columns; A rows sorted by expert, E experts.
Reference: the same products with the dequantised weights as ordinary frozen fp32 tensors
(tests/unit/test_quant_grad.py checks values and gradients against it).
"""

from __future__ import annotations

from typing import Any

import torch

from deepseek_moe.kernels.quant_matmul import quant_matmul, quant_matmul_grouped
from deepseek_moe.kernels.quant_transposed import input_grad, input_grad_grouped


def needs_grad(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


class _FrozenQuantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, scale)  # the codes themselves, not a dequantised copy
        return quant_matmul(x, q, scale)  # grad mode is off in here: the kernel path

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        q, scale = ctx.saved_tensors
        dx = input_grad(dy.reshape(-1, dy.shape[-1]), q, scale)
        return dx.view(*dy.shape[:-1], dx.shape[-1]), None, None


def frozen_quant_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ dequant(q)^T -> (..., N), differentiable in x only (``quant_matmul``'s arguments)."""
    return _FrozenQuantMatmul.apply(x, q, scale)


class _FrozenQuantGrouped(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_AK: torch.Tensor, q_E: torch.Tensor, scale_E: torch.Tensor,
                counts: list[int]) -> torch.Tensor:
        ctx.save_for_backward(q_E, scale_E)
        ctx.counts = counts
        return quant_matmul_grouped(x_AK, q_E, scale_E, counts)  # one kernel call for all experts

    @staticmethod
    def backward(ctx: Any, dy_AN: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        q_E, scale_E = ctx.saved_tensors
        return input_grad_grouped(dy_AN, q_E, scale_E, ctx.counts), None, None, None


def frozen_quant_grouped(x_AK: torch.Tensor, q_E: torch.Tensor, scale_E: torch.Tensor,
                         counts_E: torch.Tensor | list[int]) -> torch.Tensor:
    """(A, N): each expert's rows of x times its dequantised ``q_E[e]`` transposed (stacked codes (E, N, ...)
    and scales (E, N, ...) as :class:`~deepseek_moe.quant.QuantRoutedExperts` holds them); differentiable in x
    only."""
    counts = counts_E.tolist() if isinstance(counts_E, torch.Tensor) else list(counts_E)
    if sum(counts) != x_AK.shape[0]:
        raise ValueError(f"frozen_quant_grouped: counts sum to {sum(counts)}, x has {x_AK.shape[0]} rows")
    return _FrozenQuantGrouped.apply(x_AK, q_E, scale_E, counts)


__all__ = ["frozen_quant_grouped", "frozen_quant_matmul", "input_grad", "needs_grad"]
