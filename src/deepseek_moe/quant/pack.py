"""Symmetric weight-only quantisation: int8 per output channel, int4 in groups along the input.

Shapes: N output rows, K input columns, G = K / group_size groups per row.

* int8: ``q`` int8 (N, K) in [-127, 127], ``scale`` float32 (N,); w ≈ q * scale[:, None].
* int4: ``q`` in [-7, 7] per group of ``group_size`` columns, ``scale`` float16 (N, G); w ≈ q * scale.
  Stored two per byte in the portable layout: byte j of a row holds column 2j in its low nibble and column
  2j + 1 in its high nibble, each as q + 8 (so 0..15, unsigned). The CPU kernel wants a different order and
  repacks at load (:func:`repack_int4_for_kernel`; the kernel layout and its decoding live in
  ``kernels/quant_layout.py``).

Weights that the format cannot hold are refused, not approximated: inf/NaN anywhere, and (int4) a group whose
scale, max |w| / 7, is beyond float16's range (max |w| >~ 458,000). Clamping that scale to 65504 would silently
clip the group's large weights, a model that runs and is wrong; such a magnitude means a broken or mis-scaled
checkpoint, and int8 (float32 scales) holds it exactly as well as it holds anything.

Every function here takes a block of rows, so callers quantise big matrices (a 102400-row head) in row chunks
without materialising them whole in fp32.
"""

from __future__ import annotations

import torch

from deepseek_moe.kernels.quant_layout import (
    INT4_OFFSET,
    INT4_SCALE_DTYPE,
    INT8_SCALE_DTYPE,
    dequantize_int8,
    nibbles,
    unpack_int4_kernel_layout,
)

INT8_MAX = 127
INT4_MAX = 7

__all__ = ["INT4_MAX", "INT4_OFFSET", "INT4_SCALE_DTYPE", "INT8_MAX", "INT8_SCALE_DTYPE", "dequantize_int4",
           "dequantize_int8", "pack_int4", "portable_from_kernel_layout", "quantize_int4", "quantize_int8",
           "repack_int4_for_kernel", "unpack_int4", "unpack_int4_kernel_layout"]


def _refuse_non_finite(amax: torch.Tensor, what: str) -> None:
    """amax: per row (N,) or per row and group (N, G)."""
    bad = (~torch.isfinite(amax)).nonzero().tolist()
    if bad:
        where = ", ".join(f"row {i[0]}" + (f" group {i[1]}" if len(i) > 1 else "") for i in bad[:3])
        raise ValueError(f"{what}: the weight holds inf or NaN ({where}{' ...' if len(bad) > 3 else ''}); "
                         f"it cannot be quantised")


def quantize_int8(w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale float32 (N,)). An all-zero row gets scale 1 (its codes are 0 anyway)."""
    w = w_NK.float()
    amax = w.abs().amax(dim=1)
    _refuse_non_finite(amax, "int8 quantisation")
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale.to(INT8_SCALE_DTYPE)


def quantize_int4(w_NK: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 (N, K/2) portable layout, scale float16 (N, K/group_size)).

    The scale is rounded to float16 *before* the codes are chosen, so the codes are the best ones for the scale
    actually stored. A group too small for float16's scale (max |w| below ~2e-7) gets scale 0 and codes 0.
    ValueError for inf/NaN weights and for groups whose scale float16 cannot hold (see the module docstring)."""
    N, K = w_NK.shape
    if K % group_size or group_size % 2:
        raise ValueError(f"int4 needs the input width ({K}) to be a multiple of group_size ({group_size})")
    w = w_NK.float().view(N, K // group_size, group_size)
    amax = w.abs().amax(dim=2)
    _refuse_non_finite(amax, "int4 quantisation")
    scale = torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax)).to(INT4_SCALE_DTYPE)
    if (overflow := torch.isinf(scale).nonzero()).numel():
        n, g = overflow[0].tolist()
        raise ValueError(
            f"int4 quantisation: row {n}, group {g} (columns {g * group_size}..{(g + 1) * group_size - 1}) has max "
            f"|w| = {amax[n, g].item():.6g}, so its scale ({amax[n, g].item() / INT4_MAX:.6g}) is beyond float16's "
            f"largest value ({torch.finfo(INT4_SCALE_DTYPE).max:.0f}); {len(overflow)} group(s) like it. The int4 "
            f"format cannot hold this weight: quantise it to int8 (float32 scales) or keep it unquantised")
    s32 = scale.float()
    q = torch.round(w / torch.where(s32 > 0, s32, 1.0)[:, :, None]).clamp_(-INT4_MAX, INT4_MAX).to(torch.int16)
    return pack_int4(q.view(N, K)), scale


def pack_int4(q_NK: torch.Tensor) -> torch.Tensor:
    """Signed codes (N, K) in [-8, 7] -> uint8 (N, K/2): column 2j low nibble, 2j + 1 high nibble, + 8."""
    u = (q_NK.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed_NH: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: int8 codes (N, 2H)."""
    lo, hi = nibbles(packed_NH)
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


def portable_from_kernel_layout(packed_NH: torch.Tensor, group_size: int) -> torch.Tensor:
    """Kernel layout -> portable layout (for saving a loaded int4 model)."""
    return pack_int4(unpack_int4_kernel_layout(packed_NH, group_size))
