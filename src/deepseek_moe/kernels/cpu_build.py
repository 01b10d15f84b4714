"""Compile our C++ kernels (``qgemm.cpp``, ``adamw.cpp``) at run time with the system C++ compiler and load them
with ctypes; cached.

Why ctypes rather than ``torch.utils.cpp_extension``: the kernels take plain pointers, so it needs neither
pybind11 nor torch's headers, and builds in about a second instead of a minute (this matters on 2 cores and in
CI). The library is cached under ``$DEEPSEEK_MOE_CACHE`` (default ``~/.cache/deepseek_moe/kernels``), keyed by
the source, the flags and the CPU's flags, so a new machine or a changed kernel rebuilds. Any failure (no
compiler, a sandbox without a writable cache) returns None and callers use the pure-PyTorch twin;
``DEEPSEEK_MOE_KERNELS=0`` forces the twin.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("qgemm.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# -fno-math-errno: sqrtf may then be one instruction, which is what lets the optimizer's loop vectorise.
ADAMW_SOURCE, ADAMW_FLAGS = Path(__file__).with_name("adamw.cpp"), (*FLAGS, "-fno-math-errno")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def cache_dir() -> Path:
    root = os.environ.get("DEEPSEEK_MOE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "deepseek_moe" / "kernels"


def _build(compiler: str, source: Path, flags: tuple[str, ...], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes (pytest workers) never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(source), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=300)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_library(source: Path, flags: tuple[str, ...], what: str) -> ctypes.CDLL | None:
    """``source`` compiled with ``flags`` and loaded, or None (with one warning naming ``what`` falls back)."""
    if os.environ.get("DEEPSEEK_MOE_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        warnings.warn(f"no C++ compiler found: {what} use the slower pure-PyTorch path", stacklevel=3)
        return None
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + _cpu_flags().encode()
                         + compiler.encode()).hexdigest()[:16]
    lib_path = cache_dir() / f"{source.stem}-{key}.so"
    try:
        if not lib_path.is_file():
            _build(compiler, source, flags, lib_path)
        return ctypes.CDLL(str(lib_path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"building {source.name} failed, {what} use the pure-PyTorch path: {detail[-500:]}",
                      stacklevel=3)
        return None


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled quantised-matmul kernels, or None (with one warning saying why) when they cannot be had."""
    lib = build_library(SOURCE, FLAGS, "quantised matmuls")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dsm_qgemm_int8.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr, i64, ctypes.c_int]
    lib.dsm_qgemm_int8.restype = None
    lib.dsm_qgemm_int4.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, i64, ptr, i64, ctypes.c_int]
    lib.dsm_qgemm_int4.restype = None
    lib.dsm_experts.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int, ptr, ptr,
                                ctypes.c_int, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.dsm_experts.restype = None
    lib.dsm_has_avx512.restype = ctypes.c_int
    return lib


@functools.cache
def load_adamw_library() -> ctypes.CDLL | None:
    """The compiled AdamW-with-bf16-copy kernel, or None (with one warning saying why)."""
    lib = build_library(ADAMW_SOURCE, ADAMW_FLAGS, "optimizer steps")
    if lib is None:
        return None
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.dsm_adamw_step.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, f32, f32, f32, f32, f32, f32]
    lib.dsm_adamw_step.restype = None
    return lib
