"""FP8 block-scaled weights as DeepSeek-V3/R1 ship them, dequantised while streaming.

Such a checkpoint's config.json has ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
"weight_block_size": [128, 128], ...}``; each quantised linear weight W (O, I) is stored as ``float8_e4m3fn``
next to ``weight_scale_inv`` of shape (ceil(O / bo), ceil(I / bi)) float32, and the real weight is
``W[r, c] * weight_scale_inv[r // bo, c // bi]`` (the name says "inverse" because the quantiser divided by it).
Dequantisation runs one band of ``bo`` rows at a time, so the float32 intermediate stays small however large W.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from deepseek_moe.io.safetensors_file import SafetensorsFile

SCALE_SUFFIX = "_scale_inv"
SUPPORTED_FORMATS = ("e4m3",)


def fp8_block_size(quant: Mapping[str, Any], source: str) -> tuple[int, int]:
    """The (rows, columns) of one scale block from ``quantization_config``; errors name the key."""
    fmt = quant.get("fmt", "e4m3")
    if fmt not in SUPPORTED_FORMATS:
        raise ValueError(f"{source}: quantization_config.fmt ({fmt!r}) is not supported; FP8 checkpoints here "
                         "are 'e4m3' (float8_e4m3fn), as DeepSeek-V3/R1 ship them")
    block = quant.get("weight_block_size")
    if (not isinstance(block, list | tuple) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"{source}: quantization_config.weight_block_size ({block!r}) must be two positive "
                         "integers, e.g. [128, 128] (per-tensor or per-channel FP8 is not supported)")
    return int(block[0]), int(block[1])


def expected_scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    rows, cols = weight_shape
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def dequantize_rows(file: SafetensorsFile, key: str, scale: torch.Tensor, block: tuple[int, int],
                    out: torch.Tensor, start: int = 0) -> None:
    """Fill ``out`` with rows ``start .. start + len(out)`` of FP8 weight ``key`` times its block scale."""
    rows, cols = file.info(key).shape
    bo, bi = block
    n = out.shape[0]
    # Column scale pattern, one band at a time: (n_col_blocks,) -> (cols,).
    for first in range(start - start % bo, start + n, bo):
        lo, hi = max(first, start), min(first + bo, start + n, rows)
        band = file.read(key, start=lo * cols, shape=(hi - lo, cols)).float()  # (<= bo, cols) float32
        band *= scale[first // bo].repeat_interleave(bi)[:cols]
        out[lo - start:hi - start].copy_(band)


__all__ = ["SCALE_SUFFIX", "dequantize_rows", "expected_scale_shape", "fp8_block_size"]
