"""``resolve_device``: a device name from a flag or config as a torch.device, checked; ``native_bf16``: whether
its matrix products run bf16 natively (what makes bf16 autocast pay); ``keep_freed_memory``: stop malloc from
handing a step's freed tensors back to the kernel; ``release_freed_memory``: hand them back at once (peak memory
before speed)."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import torch


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a torch.device ("auto" or None: cuda when available, else cpu). ValueError naming it when it is
    not a device or asks for CUDA on a machine without it."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{name!r} is not a torch device (cpu, cuda, cuda:1, ...): {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name!r} asks for CUDA, which this machine does not have")
    return device


def cpu_bf16_feature() -> str | None:
    """The CPU feature that gives native bf16 matrix products ("AMX" or "AVX512-BF16"), or None.

    Without one, bf16 GEMMs on CPU are emulated by converting to fp32 and run no faster (often slower) than fp32,
    so bf16 autocast would only cost accuracy. torch's own probe (cpuinfo) first, /proc/cpuinfo's flags second.
    """
    probes = (("AMX", "_is_amx_tile_supported", "amx_bf16"),
              ("AVX512-BF16", "_is_avx512_bf16_supported", "avx512_bf16"))
    for name, probe, _ in probes:
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return name
    flags = _cpuinfo_flags()
    return next((name for name, _, flag in probes if flag in flags), None)


def _cpuinfo_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def native_bf16(device: torch.device) -> str | None:
    """What gives ``device`` native bf16 matrix products ("CUDA", "AMX", "AVX512-BF16"), or None."""
    if device.type == "cuda":
        return "CUDA" if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return cpu_bf16_feature()
    return None


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_MMAP_MAX = 65536  # M_MMAP_MAX's default


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # another libc under glibc's name
    return libc


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory this process frees for its next allocations. True when it took
    (False off Linux/glibc, where nothing changes).

    By default every allocation above malloc's mmap threshold (32 MB at most) is a fresh mapping, unmapped again
    on free. A training step allocates the same large tensors every time (bf16 weight copies, weight
    gradients, activations), so each step page-faults all of them in again, 4 KB at a time, zero-filled by the
    kernel -- and on a VM that reports free pages to its host (this one does), faulted in by the host as well.
    A bf16 training step of two mid-size layers here: 172K page faults and 6.7-7.1 s by default, 23-29K and
    3.8-4.9 s with this (1 thread, loaded machine). The price: the heap keeps its peak size until the process
    exits (5% more peak RSS there), which a training process holds anyway.
    """
    libc = _glibc()
    if libc is None:
        return False
    # Serve large blocks from the heap instead of fresh mappings, and never trim the heap's top.
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory(threshold: int = 1 << 20) -> bool:
    """The opposite trade to :func:`keep_freed_memory`, for a process whose peak memory is the limit: glibc's
    malloc maps every block of ``threshold`` bytes or more on its own and unmaps it when freed. True when it
    took (False off Linux/glibc).

    By default the mmap threshold follows the largest block freed (up to 32 MB), so after the first step nearly
    every tensor comes from the heap, whose freed holes of one size cannot always hold the next step's tensors of
    another: LoRA on an int8 V2-Lite at 11 layers held 1.05 GB of freed heap between steps and peaked 0.9 GB
    higher than with a fixed 1 MB threshold (benchmarks/finetune.py, docs/finetuning.md). The price is a page
    fault for every page of every large tensor, every step: set ``THP_MEM_ALLOC_ENABLE=1`` before the process
    starts and torch asks for 2 MB transparent huge pages for its blocks of 2 MB and more, 512 times fewer faults.
    """
    libc = _glibc()
    if libc is None:
        return False
    return (bool(libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
            and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold)))


__all__ = ["cpu_bf16_feature", "keep_freed_memory", "native_bf16", "release_freed_memory", "resolve_device"]
