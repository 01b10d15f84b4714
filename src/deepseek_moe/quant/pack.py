"""Symmetric weight-only quantisation: int8 per output channel, int4 in groups along the input.

Shapes: N output rows, K input columns, G = K / group_size groups per row.

* int8: ``q`` int8 (N, K) in [-127, 127], ``scale`` float32 (N,); w ≈ q * scale[:, None].
* int4: ``q`` in [-7, 7] per group of ``group_size`` columns, ``scale`` float16 (N, G); w ≈ q * scale.
  Stored two per byte in the portable layout: byte j of a row holds column 2j in its low nibble and column
  2j + 1 in its high nibble, each as q + 8 (so 0..15, unsigned). The CPU kernel wants a different order and
  repacks at load (:func:`repack_int4_for_kernel`).

Every function here takes a block of rows, so callers quantise big matrices (a 102400-row head) in row chunks
without materialising them whole in fp32.
"""

from __future__ import annotations

import torch

INT8_MAX = 127
INT4_MAX = 7
INT4_OFFSET = 8
INT8_SCALE_DTYPE = torch.float32
INT4_SCALE_DTYPE = torch.float16


def quantize_int8(w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale float32 (N,)). An all-zero row gets scale 1 (its codes are 0 anyway)."""
    w = w_NK.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale.to(INT8_SCALE_DTYPE)


def dequantize_int8(q_NK: torch.Tensor, scale_N: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q_NK.float() * scale_N.float()[:, None]).to(dtype)


def quantize_int4(w_NK: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 (N, K/2) portable layout, scale float16 (N, K/group_size)).

    The scale is rounded to float16 *before* the codes are chosen, so the codes are the best ones for the scale
    actually stored."""
    N, K = w_NK.shape
    if K % group_size or group_size % 2:
        raise ValueError(f"int4 needs the input width ({K}) to be a multiple of group_size ({group_size})")
    w = w_NK.float().view(N, K // group_size, group_size)
    amax = w.abs().amax(dim=2)
    scale = torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax)).to(INT4_SCALE_DTYPE)
    q = torch.round(w / scale.float()[:, :, None]).clamp_(-INT4_MAX, INT4_MAX).to(torch.int16)
    return pack_int4(q.view(N, K)), scale


def pack_int4(q_NK: torch.Tensor) -> torch.Tensor:
    """Signed codes (N, K) in [-8, 7] -> uint8 (N, K/2): column 2j low nibble, 2j + 1 high nibble, + 8."""
    u = (q_NK.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed_NH: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: int8 codes (N, 2H)."""
    lo = (packed_NH & 0x0F).to(torch.int8) - INT4_OFFSET
    hi = (packed_NH >> 4).to(torch.int8) - INT4_OFFSET
    return torch.stack((lo, hi), dim=2).view(packed_NH.shape[0], -1)


def dequantize_int4(packed_NH: torch.Tensor, scale_NG: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int4(packed_NH).float()
    N, K = q.shape
    G = scale_NG.shape[1]
    return (q.view(N, G, K // G) * scale_NG.float()[:, :, None]).view(N, K).to(dtype)


def repack_int4_for_kernel(packed_NH: torch.Tensor, group_size: int) -> torch.Tensor:
    """Portable layout -> kernel layout: inside each group of ``group_size`` columns, byte j holds column j
    (low nibble) and column j + group_size/2 (high nibble), so one vector load yields two runs of adjacent
    columns (no shuffles in the inner loop)."""
    return _regroup(unpack_int4(packed_NH), group_size)


def _regroup(q_NK: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = q_NK.shape
    half = group_size // 2
    u = (q_NK.to(torch.int16) + INT4_OFFSET).to(torch.uint8).view(N, K // group_size, 2, half)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4_kernel_layout(packed_NH: torch.Tensor, group_size: int) -> torch.Tensor:
    """The inverse of :func:`repack_int4_for_kernel`: int8 codes (N, K)."""
    N, H = packed_NH.shape
    half = group_size // 2
    g = packed_NH.view(N, H // half, half)
    lo = (g & 0x0F).to(torch.int8) - INT4_OFFSET
    hi = (g >> 4).to(torch.int8) - INT4_OFFSET
    return torch.cat((lo, hi), dim=2).view(N, 2 * H)


def portable_from_kernel_layout(packed_NH: torch.Tensor, group_size: int) -> torch.Tensor:
    """Kernel layout -> portable layout (for saving a loaded int4 model)."""
    return pack_int4(unpack_int4_kernel_layout(packed_NH, group_size))
