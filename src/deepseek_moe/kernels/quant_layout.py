"""The weight layouts the CPU kernels read, and their plain-PyTorch decoding: the reference every compiled path
is tested against, and the one place int4 nibbles are unpacked.

Shapes: N output rows, K input columns, G = K / group_size groups per row, H = K / 2 bytes per int4 row.

* int8: codes int8 (N, K) in [-127, 127], float32 per-row scales (N,); w = q * scale[:, None].
* int4, *kernel* layout: uint8 (N, H); inside each group of ``group_size`` columns, byte j holds column j in its
  low nibble and column j + group_size/2 in its high one, each as code + 8 (0..15); float16 scales (N, G).
  One vector load then yields two runs of adjacent columns (no shuffles in the kernels' inner loops).

``quant/pack.py`` quantises weights and converts between this and the portable checkpoint layout; it imports
its nibble decoding from here (kernels/ sits below quant/, which builds its modules on these kernels).
"""

from __future__ import annotations

import torch

INT4_OFFSET = 8
INT8_SCALE_DTYPE = torch.float32
INT4_SCALE_DTYPE = torch.float16


def nibbles(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 bytes -> (low, high) nibbles as signed int8 codes (stored value - 8), each packed's shape."""
    lo = (packed & 0x0F).to(torch.int8) - INT4_OFFSET
    hi = (packed >> 4).to(torch.int8) - INT4_OFFSET
    return lo, hi


def unpack_int4_kernel_layout(packed_NH: torch.Tensor, group_size: int) -> torch.Tensor:
    """Kernel-layout int4 -> int8 codes (N, K)."""
    N, H = packed_NH.shape
    lo, hi = nibbles(packed_NH.reshape(N, 2 * H // group_size, group_size // 2))
    return torch.cat((lo, hi), dim=2).view(N, 2 * H)  # per group: low nibbles first, then high


def dequantize_int8(q_NK: torch.Tensor, scale_N: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q_NK.float() * scale_N.float()[:, None]).to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) matrix of an int8 (q int8) or kernel-layout int4 (q uint8) weight."""
    if q.dtype == torch.int8:
        return dequantize_int8(q, scale, dtype)
    N, H = q.shape
    G = scale.shape[1]
    codes = unpack_int4_kernel_layout(q, 2 * H // G).float().view(N, G, 2 * H // G)
    return (codes * scale.float()[:, :, None]).view(N, 2 * H).to(dtype)
