"""dx = dy @ dequant(W): the transposed quantised product that the backward of a frozen layer needs (LoRA on a
quantised base, quant/grad.py), for one weight or for the routed experts of a layer at once.

* :func:`input_grad_reference` dequantises ``TILE_ROWS`` rows of W at a time in dy's dtype and matmuls: the
  readable twin, and the path for int4 codes, autograd through the backward, other devices and no compiler.
* :func:`input_grad` / :func:`input_grad_grouped` run qgemm.cpp's ``dsm_qgrad_int8`` for int8 codes on the CPU:
  the codes are widened in registers, never converted to a float tile in memory (that conversion was ~20% of a
  V2-Lite LoRA step, once per expert per step), parallel over columns of dx, one call for all experts of a layer.
  Inside :func:`~deepseek_moe.kernels.switch.reference_paths` (or with ``DEEPSEEK_MOE_KERNELS=0``) the twin runs.

Shapes: M rows of dy, N rows of W (dy's columns), K its columns; A rows sorted by expert, E experts.
"""

from __future__ import annotations

from typing import Any

import torch

from deepseek_moe.kernels import quant_matmul
from deepseek_moe.kernels.cpu_build import load_library
from deepseek_moe.kernels.quant_layout import dequantize
from deepseek_moe.kernels.switch import fast_paths_enabled


def input_grad_reference(dy_MN: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """dy (M, N) @ dequant(W) (N, K) -> (M, K), dequantising ``quant_matmul.TILE_ROWS`` rows of W at a time in
    dy's dtype.

    int8 (one scale per row n): dy @ (s * Q) = (dy * s) @ Q, so the tile is only converted, not also scaled."""
    N, TILE_ROWS = q.shape[0], quant_matmul.TILE_ROWS
    dx_MK: torch.Tensor | None = None
    for n0 in range(0, N, TILE_ROWS):
        rows = slice(n0, n0 + TILE_ROWS)
        if q.dtype == torch.int8:
            w_nK = q[rows].to(dy_MN.dtype)
            dy_Mn = dy_MN[:, rows] * scale[rows].to(dy_MN.dtype)
        else:
            w_nK = dequantize(q[rows], scale[rows], dy_MN.dtype)
            dy_Mn = dy_MN[:, rows]
        dx_MK = dy_Mn @ w_nK if dx_MK is None else dx_MK.addmm_(dy_Mn, w_nK)
    assert dx_MK is not None  # N >= 1: a weight has rows
    return dx_MK


def input_grad_grouped_reference(dy_AN: torch.Tensor, q_E: torch.Tensor, scale_E: torch.Tensor,
                                 counts: list[int]) -> torch.Tensor:
    """(A, K): each expert's rows of dy times its dequantised ``q_E[e]``, one expert at a time."""
    K = q_E.shape[2] * (2 if q_E.dtype == torch.uint8 else 1)  # int4: two codes a byte
    return quant_matmul.per_expert(input_grad_reference, dy_AN, q_E, scale_E, counts, K)


def _kernel(dy: torch.Tensor, q: torch.Tensor) -> Any:
    """The compiled library when it serves this call (int8 codes, CPU, no graph through the backward), else None."""
    if q.dtype != torch.int8 or dy.device.type != "cpu" or not fast_paths_enabled():
        return None
    if dy.requires_grad and torch.is_grad_enabled():  # create_graph=True: the twin keeps the graph
        return None
    return load_library()


def input_grad_grouped(dy_AN: torch.Tensor, q_E: torch.Tensor, scale_E: torch.Tensor,
                       counts: list[int]) -> torch.Tensor:
    """:func:`input_grad_grouped_reference`, in one kernel call for all experts where the kernel serves.
    ``q_E`` (E, N, K) int8 and ``scale_E`` (E, N) fp32 contiguous, as QuantRoutedExperts holds them."""
    lib = _kernel(dy_AN, q_E)
    if lib is None or not q_E.is_contiguous() or not scale_E.is_contiguous():
        return input_grad_grouped_reference(dy_AN, q_E, scale_E, counts)
    E, N, K = q_E.shape
    if len(counts) != E or sum(counts) != dy_AN.shape[0] or dy_AN.shape[-1] != N:
        raise ValueError(f"input_grad_grouped: dy {tuple(dy_AN.shape)} and counts (sum {sum(counts)}, "
                         f"{len(counts)} experts) do not fit codes {tuple(q_E.shape)}")
    len_E = torch.tensor(counts, dtype=torch.int64)
    start_E = torch.cumsum(len_E, 0) - len_E
    dx = _run(lib, dy_AN, q_E, scale_E, start_E, len_E, E, N, K)
    return dx if dy_AN.dtype is torch.float32 else dx.to(dy_AN.dtype)


# Rows of W per kernel call: the kernel widens each panel of codes into an (N, 16) fp32 strip meant to stay in L2;
# at a vocabulary's N (V2-Lite's head: 102,400 rows, a 6.5 MB strip) it does not, and the head's backward ran at
# 105 GFLOP/s against 146 in calls of 4,096 rows (256 KB strips) summed (512 x 2048 dy, 2 threads, idle).
CHUNK_ROWS = 4096


def input_grad(dy_MN: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`input_grad_reference` through the kernel where it serves (int8 codes (N, K), fp32 scales (N,)),
    ``CHUNK_ROWS`` rows of W a call, the calls' products summed."""
    lib = _kernel(dy_MN, q)
    if lib is None or not q.is_contiguous() or not scale.is_contiguous() or dy_MN.shape[0] == 0:
        return input_grad_reference(dy_MN, q, scale)
    N, K = q.shape
    start, one = torch.zeros(1, dtype=torch.int64), torch.tensor([dy_MN.shape[0]], dtype=torch.int64)
    dx_MK: torch.Tensor | None = None
    for n0 in range(0, N, CHUNK_ROWS):
        rows = slice(n0, n0 + CHUNK_ROWS)
        part = _run(lib, dy_MN[:, rows], q[rows], scale[rows], start, one, 1, q[rows].shape[0], K)
        dx_MK = part if dx_MK is None else dx_MK.add_(part)  # fp32: summed before any narrowing
    assert dx_MK is not None  # N >= 1: a weight has rows
    return dx_MK if dy_MN.dtype is torch.float32 else dx_MK.to(dy_MN.dtype)


def _run(lib: Any, dy: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, start: torch.Tensor,
         length: torch.Tensor, G: int, N: int, K: int) -> torch.Tensor:
    dy32 = dy.float().contiguous()
    scale32 = scale.float().contiguous()
    dx = torch.empty(dy.shape[0], K, dtype=torch.float32)
    lib.dsm_qgrad_int8(dy32.data_ptr(), N, K, G, start.data_ptr(), length.data_ptr(), q.data_ptr(),
                       scale32.data_ptr(), dx.data_ptr(), torch.get_num_threads())
    return dx  # fp32


__all__ = ["input_grad", "input_grad_grouped", "input_grad_grouped_reference", "input_grad_reference"]
