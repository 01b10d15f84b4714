"""What the Hugging Face layouts share (DeepSeek-V2/V3 in io/hf.py, DeepSeekMoE 16B in io/hf_deepseek.py): token
ids that may be lists, and which ``quantization_config`` this package reads."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from deepseek_moe.io.formats import registered_methods
from deepseek_moe.io.fp8 import fp8_block_size


def token_id(value: Any, key: str, source: str) -> int | None:
    if isinstance(value, list):
        if not value:
            return None
        if len(value) > 1:
            warnings.warn(f"{source}: {key} {value!r} is a list; keeping only the first id", stacklevel=3)
        return int(value[0])
    return value


# quant_method values this loader reads: FP8 block-scaled (dequantised while streaming) and the formats registered
# with io/formats.py (deepseek_moe.quant's own), read through the same loader's hooks.
FP8_METHOD = "fp8"


def check_quantization(hf: Mapping[str, Any], source: str) -> None:
    """Refuse a ``quantization_config`` this package cannot read, naming it."""
    quant = hf.get("quantization_config")
    if not quant:
        return
    method = quant.get("quant_method") if isinstance(quant, Mapping) else None
    if method == FP8_METHOD:
        fp8_block_size(quant, source)  # validates fmt and weight_block_size
        return
    if method in registered_methods():
        return
    raise ValueError(f"{source}: quantization_config.quant_method {method!r} is not supported; this loader reads "
                     f"FP8 block-scaled checkpoints ('fp8', as DeepSeek-V3/R1 ship them) and its own "
                     f"{', '.join(map(repr, registered_methods()))}")


__all__ = ["FP8_METHOD", "check_quantization", "token_id"]
