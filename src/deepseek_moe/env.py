"""Every environment variable deepseek_moe reads, each with one meaning, read in one place.

* ``DEEPSEEK_MOE_CACHE``: the root of every cache the package writes (default ``~/.cache/deepseek_moe``):
  compiled kernels in ``kernels/``, trained tokenizers in ``tokenizers/``, token arrays beside them.
* ``DEEPSEEK_MOE_KERNELS=0``: use the pure-PyTorch twins instead of any compiled or native fast path (our C++
  kernels and MKL's batched GEMM).
* ``DEEPSEEK_MOE_KERNEL_ISA``: force the instruction set the quantised-matmul kernel uses (``scalar``, ``avx2``,
  ``avx512``, ``avx512vnni``; default: the best this CPU runs), for tests and benchmarks.
* ``DEEPSEEK_MOE_QUANT_ACTIVATIONS``: what the quantised-matmul kernel multiplies int8 / int4 weights with:
  ``int8`` (activations quantised per block of 32, integer dot products) or ``fp32`` (activations as they are);
  default in ``kernels/quant_matmul.py``.
* ``CXX``: the C++ compiler that builds the kernels (default: ``g++``, else ``c++``, on PATH).

Torch's own launch variables (``WORLD_SIZE``, ``LOCAL_RANK``) are read in ``parallel/`` with torchrun's meaning.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE = "DEEPSEEK_MOE_CACHE"
KERNELS = "DEEPSEEK_MOE_KERNELS"
KERNEL_ISA = "DEEPSEEK_MOE_KERNEL_ISA"
QUANT_ACTIVATIONS = "DEEPSEEK_MOE_QUANT_ACTIVATIONS"


def cache_root() -> Path:
    """``$DEEPSEEK_MOE_CACHE``, else ``~/.cache/deepseek_moe``."""
    root = os.environ.get(CACHE)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "deepseek_moe"


def kernels_enabled() -> bool:
    """False when ``DEEPSEEK_MOE_KERNELS=0``."""
    return os.environ.get(KERNELS, "1") != "0"


def kernel_isa() -> str | None:
    """The instruction set ``DEEPSEEK_MOE_KERNEL_ISA`` forces, lower-cased, or None (choose from CPUID)."""
    value = os.environ.get(KERNEL_ISA, "").strip().lower()
    return value or None


def quant_activations() -> str | None:
    """The activation format ``DEEPSEEK_MOE_QUANT_ACTIVATIONS`` asks for, lower-cased, or None (the default)."""
    value = os.environ.get(QUANT_ACTIVATIONS, "").strip().lower()
    return value or None


def cxx() -> str | None:
    """``$CXX`` when set."""
    return os.environ.get("CXX") or None
