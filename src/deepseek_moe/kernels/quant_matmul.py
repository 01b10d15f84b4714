"""y = x @ dequant(W)^T for weight-only int8 / int4 weights: the readable reference and the fast CPU path.

Weights (see ``deepseek_moe.quant.pack``): int8 codes (N, K) with float32 per-row scales (N,), or int4 codes
packed in the *kernel* layout, uint8 (N, K/2), with float16 group scales (N, K/group_size).

* :func:`quant_matmul_reference` dequantises the whole matrix and calls matmul: obviously right, slow.
* :func:`quant_matmul` picks, by the number of rows of x:
  - few rows (decode, small expert groups): the C++ kernel of ``qgemm.cpp``, which streams the codes once and
    never writes a dequantised matrix (memory-bound work should move as few bytes as possible);
  - many rows (prefill): dequantise tiles of W to x's dtype and use the ordinary GEMM, which is compute-bound
    and faster than any hand-written loop here; tiles keep a 102400-row head from being materialised whole.
  Without the compiled kernel (no compiler, or ``DEEPSEEK_MOE_KERNELS=0``) the tiled path serves every shape.
"""

from __future__ import annotations

import torch

from deepseek_moe.kernels.cpu_build import load_library

# At or below this many rows of x the GEMV-style kernel wins (measured: benchmarks/quant_kernels.py).
KERNEL_MAX_ROWS = 16
# Rows of W dequantised at a time on the tiled path: 4096 x 2048 fp32 is 32 MB.
TILE_ROWS = 4096


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) matrix of an int8 (q int8) or kernel-layout int4 (q uint8) weight."""
    if q.dtype == torch.int8:
        return (q.float() * scale.float()[:, None]).to(dtype)
    N, H = q.shape
    G = scale.shape[1]
    group_size = 2 * H // G
    half = group_size // 2
    g = q.view(N, G, half)
    lo = (g & 0x0F).to(torch.int8) - 8
    hi = (g >> 4).to(torch.int8) - 8
    codes = torch.cat((lo, hi), dim=2).float()  # (N, G, group_size): low nibbles first, then high
    return (codes * scale.float()[:, :, None]).view(N, 2 * H).to(dtype)


def quant_matmul_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> (..., N), computed in float32 and returned in x's dtype."""
    return (x.float() @ dequantize(q, scale).t()).to(x.dtype)


def _check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    K = x.shape[-1]
    k_codes = q.shape[1] * (2 if q.dtype == torch.uint8 else 1)
    if k_codes != K:
        raise ValueError(f"quantised matmul: input width {K} does not match the weight's {k_codes} columns "
                         f"(codes {tuple(q.shape)} {q.dtype})")
    if scale.shape[0] != q.shape[0]:
        raise ValueError(f"quantised matmul: {scale.shape[0]} scale rows for {q.shape[0]} weight rows")


def quant_matmul_tiled(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dequantise TILE_ROWS rows of W at a time in x's dtype and matmul (prefill, and the no-compiler path)."""
    N = q.shape[0]
    tiles = [x @ dequantize(q[n0:n0 + TILE_ROWS], scale[n0:n0 + TILE_ROWS], x.dtype).t()
             for n0 in range(0, N, TILE_ROWS)]
    return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=-1)


def quant_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, *, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """x (..., K) @ dequant(q)^T -> (..., N) in x's dtype. ``out`` (M, N) float32, optional, for the kernel."""
    _check(x, q, scale)
    M = x.numel() // x.shape[-1]
    lib = load_library() if x.device.type == "cpu" and not x.requires_grad else None
    if lib is None or M > KERNEL_MAX_ROWS or M == 0:
        return quant_matmul_tiled(x, q, scale)
    K, N = x.shape[-1], q.shape[0]
    x32 = x.reshape(M, K).float().contiguous()
    y = out if out is not None else torch.empty(M, N, dtype=torch.float32)
    q, scale = q.contiguous(), scale.contiguous()
    threads = torch.get_num_threads()
    if q.dtype == torch.int8:
        lib.dsm_qgemm_int8(x32.data_ptr(), K, M, K, q.data_ptr(), scale.data_ptr(), N, y.data_ptr(), N, threads)
    else:
        group_size = 2 * q.shape[1] // scale.shape[1]
        lib.dsm_qgemm_int4(x32.data_ptr(), K, M, K, q.data_ptr(), scale.data_ptr(), group_size, N, y.data_ptr(),
                           N, threads)
    return y.to(x.dtype).view(*x.shape[:-1], N)


def kernel_available() -> bool:
    return load_library() is not None
