"""Grouped fp32 linear layers on the CPU through MKL's batched GEMM: the routed experts' products, all experts in
one ``cblas_sgemm_batch`` call, which spreads the experts over the threads.

Why: torch's CPU ``grouped_mm`` runs one GEMM after another, each split over all threads. At ~150 rows an expert
(160 experts, top-6 of 4,096 tokens) those GEMMs are too small to split well: one projection took 82 ms against
42 ms for MKL's batch, which is what one GEMM of the same FLOPs takes (2 threads, fp32; benchmarks/moe_layer.py
has the layer-level numbers). MKL ships inside torch's CPU wheel and exports its CBLAS batch entry point from
``libtorch_cpu.so``; where it is missing (another build, another BLAS) :func:`available` is False and the experts
use ``F.grouped_mm``, the reference the tests compare against. bf16 has no batched MKL entry point; it stays on
``grouped_mm`` (oneDNN).
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from deepseek_moe import env

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


@functools.cache
def _library() -> Any:
    if not env.kernels_enabled():
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        fn = lib.cblas_sgemm_batch
    except (OSError, AttributeError):
        return None
    fn.restype = None
    return fn


def available() -> bool:
    """Whether MKL's batched fp32 GEMM can be called (torch's own MKL, LP64: 32-bit sizes)."""
    return _library() is not None and torch.backends.mkl.is_available()


def _ints(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.int32).contiguous()


def _gemm_batch(trans_a: int, trans_b: int, m: torch.Tensor, n: int, k: torch.Tensor | int,
                a_ptrs: torch.Tensor, lda: int, b_ptrs: torch.Tensor, ldb: int, c_ptrs: torch.Tensor, ldc: int) -> None:
    """C_g = op(A_g) @ op(B_g) for each group g (one matrix each); m, k per group, the rest shared."""
    G = int(m.numel())
    if G == 0:
        return
    ones = torch.ones(G, dtype=torch.int32)
    k_t = k if isinstance(k, torch.Tensor) else torch.full((G,), k)
    args = [_ints(ones * trans_a), _ints(ones * trans_b), _ints(m), _ints(ones * n), _ints(k_t),
            torch.ones(G, dtype=torch.float32), a_ptrs, _ints(ones * lda), b_ptrs, _ints(ones * ldb),
            torch.zeros(G, dtype=torch.float32), c_ptrs, _ints(ones * ldc)]
    keep = [t.contiguous() for t in args]  # alive until the call returns
    p = [ctypes.c_void_p(t.data_ptr()) for t in keep]
    _library()(_ROW_MAJOR, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12],
               ctypes.c_int(G), ctypes.c_void_p(ones.data_ptr()))


def _row_ptrs(t: torch.Tensor, first_row: torch.Tensor) -> torch.Tensor:
    """Addresses of rows ``first_row`` of the 2-D contiguous fp32 ``t``."""
    return t.data_ptr() + first_row.to(torch.int64) * (t.stride(0) * 4)


def _matrix_ptrs(w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return w.data_ptr() + index.to(torch.int64) * (w.stride(0) * 4)


class _GroupedLinear(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e].T, rows sorted by expert, ``counts[e]`` rows for expert e."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        x, w = x.contiguous(), w.contiguous()
        E, N, D = w.shape
        starts = counts.cumsum(0) - counts
        used = (counts > 0).nonzero().flatten()
        y = x.new_empty(x.shape[0], N)
        _gemm_batch(_NO_TRANS, _TRANS, counts[used], N, D, _row_ptrs(x, starts[used]), D,
                    _matrix_ptrs(w, used), D, _row_ptrs(y, starts[used]), N)
        ctx.save_for_backward(x, w, counts, starts, used)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w, counts, starts, used = ctx.saved_tensors
        dy = dy.contiguous()
        E, N, D = w.shape
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dx[rows of e] = dy[rows of e] @ w[e]
            dx = x.new_empty(x.shape)
            _gemm_batch(_NO_TRANS, _NO_TRANS, counts[used], D, N, _row_ptrs(dy, starts[used]), N,
                        _matrix_ptrs(w, used), D, _row_ptrs(dx, starts[used]), D)
        if ctx.needs_input_grad[1]:  # dw[e] = dy[rows of e].T @ x[rows of e]; experts without rows get zeros
            dw = w.new_zeros(w.shape) if int(used.numel()) < E else w.new_empty(w.shape)
            _gemm_batch(_TRANS, _NO_TRANS, torch.full((int(used.numel()),), N), D, counts[used],
                        _row_ptrs(dy, starts[used]), N, _row_ptrs(x, starts[used]), D,
                        _matrix_ptrs(dw, used), D)
        return dx, dw, None


def fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`grouped_linear` takes these operands: fp32 CPU tensors, sizes within MKL's 32-bit ints."""
    return (available() and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and w.device.type == "cpu" and max(x.shape[0], *w.shape) < 2**31)


def grouped_linear(x_AD: torch.Tensor, w_END: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """(A, N): each expert's rows of ``x_AD`` times its ``w_END[e]`` transposed (``F.grouped_mm(x, w.mT,
    offs=counts.cumsum(0))``), through MKL's batched GEMM."""
    return _GroupedLinear.apply(x_AD, w_END, counts_E.to(torch.int64))


__all__ = ["available", "fits", "grouped_linear"]
