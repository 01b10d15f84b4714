"""y = x @ dequant(W)^T for weight-only int8 / int4 weights: the readable reference and the fast CPU path.

Weights (see ``deepseek_moe.quant.pack``): int8 codes (N, K) with float32 per-row scales (N,), or int4 codes
packed in the *kernel* layout, uint8 (N, K/2), with float16 group scales (N, K/group_size).

* :func:`quant_matmul_reference` dequantises the whole matrix and calls matmul: obviously right, slow.
* :func:`quant_matmul` picks, by the number of rows of x:
  - on the CPU without autograd: the C++ kernel of ``qgemm.cpp``, which streams the codes once per 64 rows of x
    and never writes a dequantised matrix (decode is memory-bound: move as few bytes as possible);
  - otherwise (autograd, other devices, no compiler, or ``DEEPSEEK_MOE_KERNELS=0``): dequantise tiles of W to
    x's dtype and use the ordinary matmul; tiles keep a 102400-row head from being materialised whole.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F

from deepseek_moe.kernels.cpu_build import load_library

# Up to this many rows of x the kernel runs; beyond, dequantised tiles + GEMM. Measured at 1408x2048 on this
# CPU (benchmarks/quant_kernels.py --rows): the kernel still matched the fp32 GEMM at 128 rows and beat
# dequantise-then-GEMM at every size up to there (torch's dequantisation costs more than the GEMM saves).
KERNEL_MAX_ROWS = 1 << 20
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


def quant_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ dequant(q)^T -> (..., N) in x's dtype."""
    _check(x, q, scale)
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    lib = _kernel_for(x)
    if lib is None or M > KERNEL_MAX_ROWS or M == 0:
        return quant_matmul_tiled(x, q, scale)
    N = q.shape[0]
    x32 = x.reshape(M, K).float().contiguous()  # both no-ops for a contiguous fp32 x
    y = torch.empty(M, N, dtype=torch.float32)
    if q.dtype == torch.int8:
        lib.dsm_qgemm_int8(x32.data_ptr(), K, M, K, q.data_ptr(), scale.data_ptr(), N, y.data_ptr(), N,
                           torch.get_num_threads())
    else:
        lib.dsm_qgemm_int4(x32.data_ptr(), K, M, K, q.data_ptr(), scale.data_ptr(), 2 * q.shape[1] // scale.shape[1],
                           N, y.data_ptr(), N, torch.get_num_threads())
    return y.view(*x.shape[:-1], N).to(x.dtype)


def _kernel_for(x: torch.Tensor) -> Any:
    """The compiled library when it can serve x (CPU, no autograd), else None."""
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return None
    return load_library()


def kernel_available() -> bool:
    return load_library() is not None


# ----------------------------------------------------------------------------------------------------------
# The routed experts of one layer in one call


def experts_reference(x_AD: torch.Tensor, counts_E: torch.Tensor, gates_A: torch.Tensor | None,
                      w: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Readable twin of :func:`quant_experts`: per expert, SwiGLU on its rows with dequantised weights.
    ``w`` maps "w1"/"w2"/"w3" to stacked (codes (E, ...), scales (E, ...))."""
    y = x_AD.new_zeros(x_AD.shape[0], w["w2"][0].shape[1])
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            x = x_AD[start:start + n].float()
            h = F.silu(x @ dequantize(w["w1"][0][e], w["w1"][1][e]).t()) * (x @ dequantize(w["w3"][0][e], w["w3"][1][e]).t())
            if gates_A is not None:
                h = h * gates_A[start:start + n, None].float()
            y[start:start + n] = (h @ dequantize(w["w2"][0][e], w["w2"][1][e]).t()).to(y.dtype)
        start += n
    return y


def quant_experts(x_AD: torch.Tensor, counts_E: torch.Tensor, gates_A: torch.Tensor | None,
                  w: dict[str, tuple[torch.Tensor, torch.Tensor]], group_size: int) -> torch.Tensor | None:
    """The fused C++ path of :func:`experts_reference`, or None when it does not apply (no kernel, autograd,
    or an expert with more than KERNEL_MAX_ROWS rows)."""
    lib = _kernel_for(x_AD)
    counts = counts_E.tolist()
    if lib is None or max(counts, default=0) > KERNEL_MAX_ROWS:
        return None
    active = [(e, n) for e, n in enumerate(counts) if n]
    starts = list(itertools.accumulate(counts, initial=0))
    meta = torch.tensor([[e for e, _ in active], [starts[e] for e, _ in active], [n for _, n in active]],
                        dtype=torch.int64)
    A, D = x_AD.shape
    (w1, s1), (w3, s3), (w2, s2) = w["w1"], w["w3"], w["w2"]
    F_ = w1.shape[1]
    x32 = x_AD.float().contiguous()
    h1, h3 = torch.empty(A, F_), torch.empty(A, F_)
    y = torch.empty(A, D)
    g = None if gates_A is None else gates_A.float().contiguous()
    lib.dsm_experts(x32.data_ptr(), A, D, F_, len(active), meta[0].data_ptr(), meta[1].data_ptr(),
                    meta[2].data_ptr(), w1.data_ptr(), w3.data_ptr(), s1.data_ptr(), s3.data_ptr(),
                    8 if w1.dtype == torch.int8 else 4, w2.data_ptr(), s2.data_ptr(),
                    8 if w2.dtype == torch.int8 else 4, group_size, None if g is None else g.data_ptr(),
                    h1.data_ptr(), h3.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y.to(x_AD.dtype)
