"""Compile our C++ kernels (``qgemm.cpp``, ``float_gemm.cpp``, ``mla_decode.cpp``, ``rms_norm.cpp``,
``adamw.cpp``) at run time with the system C++ compiler and load them with ctypes; cached, and verified before
anything is loaded.

Why ctypes rather than ``torch.utils.cpp_extension``: the kernels take plain pointers, so it needs neither
pybind11 nor torch's headers, and builds in about a second instead of a minute (this matters on 2 cores and in
CI).

The cache is ``$DEEPSEEK_MOE_CACHE/kernels`` (see ``deepseek_moe.env``), one file per source, flags, compiler
(and CPU, for ``-march=native`` builds), so a changed kernel or a new machine rebuilds. Loading a library runs
its code, so the cache must not be a place where someone else can put one:

* the directory is created 0700 and used only if it is a real directory owned by this user that neither group
  nor others may write; otherwise a warning names the problem and a private temporary directory is used;
* each build records the SHA-256 of the library in a sidecar ``<name>.so.sha256`` (written atomically); before
  loading, the library is opened once, checked (a regular file owned by this user, not group/other-writable,
  whose bytes hash to the sidecar's value) and loaded through that same open file (``/proc/self/fd``), so the
  bytes checked are the bytes loaded. Anything that fails the check is rebuilt, with a warning.

Any failure (no compiler, no usable directory) returns None and callers use the pure-PyTorch twin;
``DEEPSEEK_MOE_KERNELS=0`` forces the twin.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

from deepseek_moe import env

SOURCE = Path(__file__).with_name("qgemm.cpp")
# No -march: the SIMD paths are compiled through target attributes and picked from CPUID at run time, so one
# build runs on any CPU of the architecture (and a cache shared between machines stays valid).
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# -fno-math-errno: sqrtf may then be one instruction, which is what lets the optimizer's loop vectorise.
FLOAT_GEMM_SOURCE = Path(__file__).with_name("float_gemm.cpp")  # fp32/bf16 weights, built with FLAGS
MLA_DECODE_SOURCE = Path(__file__).with_name("mla_decode.cpp")  # absorbed MLA, a few new tokens; FLAGS
RMS_NORM_SOURCE = Path(__file__).with_name("rms_norm.cpp")  # RMSNorm of a few rows; FLAGS
ADAMW_SOURCE, ADAMW_FLAGS = Path(__file__).with_name("adamw.cpp"), (*FLAGS, "-march=native", "-fno-math-errno")

# The quantised-matmul kernel's instruction sets, in the order of qgemm.cpp's enum.
ISAS = ("scalar", "avx2", "avx512", "avx512vnni")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else -1


def _unsafe(st: os.stat_result, what: str) -> str | None:
    """Why a file or directory with this stat may have been written by someone else, or None."""
    if _uid() >= 0 and st.st_uid != _uid():
        return f"{what} is owned by uid {st.st_uid}, not by this user (uid {_uid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def check_private_dir(path: Path) -> str | None:
    """Create ``path`` (mode 0700) if missing; None if it is a directory only this user can write, else why not."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        return f"{path} cannot be created: {e}"
    risk = "a library someone else put there would run in this process"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory (a symbolic link is not accepted: {risk})"
    problem = _unsafe(st, str(path))
    return None if problem is None else f"{problem}: {risk}"


@functools.cache
def _fallback_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="deepseek_moe-kernels-"))  # 0700, ours
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def cache_dir() -> Path:
    """Where compiled kernels live: ``$DEEPSEEK_MOE_CACHE/kernels`` when it is private to this user, else (with
    a warning saying why) a temporary directory of this process."""
    wanted = env.cache_root() / "kernels"
    problem = check_private_dir(wanted)
    if problem is None:
        return wanted
    _warn_once(f"not using the kernel cache: {problem}. Building in a private temporary directory instead (set "
               f"{env.CACHE} to a directory only you can write to keep builds between runs).")
    return _fallback_dir()


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def compiler() -> str | None:
    return env.cxx() or shutil.which("g++") or shutil.which("c++")


def _included(source: Path) -> bytes:
    """The bytes of the files ``source`` includes by a quoted name beside it (``#include "qgemm_q8.inc"``): they
    are part of what is compiled, so of the cache key."""
    out = b""
    for line in source.read_text().splitlines():
        if line.startswith('#include "'):
            out += (source.parent / line.split('"')[1]).read_bytes()
    return out


def library_path(source: Path, flags: tuple[str, ...], cxx: str) -> Path:
    """The cache path of ``source`` built with ``flags`` by ``cxx``."""
    native = any(f.startswith("-march=native") for f in flags)
    key = hashlib.sha256(source.read_bytes() + _included(source) + " ".join(flags).encode() + cxx.encode()
                         + (_cpu_flags().encode() if native else b"")).hexdigest()[:16]
    return cache_dir() / f"{source.stem}-{key}.so"


def sidecar(lib_path: Path) -> Path:
    return lib_path.with_name(lib_path.name + ".sha256")


def _read_checked(fd: int, what: str) -> bytes:
    """The contents of an open file, after checking that only this user could have written it."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise PermissionError(f"{what} is not a regular file")
    if (problem := _unsafe(st, what)) is not None:
        raise PermissionError(problem)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))


def _recorded_digest(lib_path: Path) -> str:
    fd = _open(sidecar(lib_path))
    try:
        return _read_checked(fd, str(sidecar(lib_path))).decode("ascii", "replace").strip()
    finally:
        os.close(fd)


def _dlopen(fd: int, path: Path) -> ctypes.CDLL:
    """Load the file open as ``fd`` (not whatever ``path`` names by now); takes ownership of ``fd``.

    The fd stays open for the life of the process: the dynamic loader recognises libraries by name, so a later
    library opened under a reused /proc/self/fd number would otherwise be taken for this one."""
    by_fd = f"/proc/self/fd/{fd}"
    if not os.path.exists(by_fd):  # no /proc: load by name (a small window between check and load remains)
        os.close(fd)
        return ctypes.CDLL(str(path))
    try:
        return ctypes.CDLL(by_fd)
    except OSError:
        os.close(fd)
        raise


def load_verified(lib_path: Path) -> ctypes.CDLL:
    """Load ``lib_path`` if it is ours and hashes to its sidecar's SHA-256; raise OSError (saying why) if not."""
    digest = _recorded_digest(lib_path)
    fd = _open(lib_path)
    try:
        actual = hashlib.sha256(_read_checked(fd, str(lib_path))).hexdigest()
        if actual != digest:
            raise PermissionError(f"{lib_path} has SHA-256 {actual[:16]}..., its build recorded {digest[:16]}...")
    except BaseException:
        os.close(fd)
        raise
    return _dlopen(fd, lib_path)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_and_load(cxx: str, source: Path, flags: tuple[str, ...], lib_path: Path) -> ctypes.CDLL:
    """Compile beside ``lib_path``, record the hash, move into place, and load the bytes just compiled.

    Concurrent processes (pytest workers) never see a half-written file; whichever build lands last wins, and
    each process loads its own build through its open file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{lib_path.name}.", suffix=".so", dir=lib_path.parent)
    os.close(fd)
    try:
        subprocess.run([cxx, *flags, str(source), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=300)
        os.chmod(tmp, 0o700)
        fd = _open(Path(tmp))
        try:
            digest = hashlib.sha256(_read_checked(fd, tmp)).hexdigest()
            _write_atomic(sidecar(lib_path), (digest + "\n").encode())
            os.replace(tmp, lib_path)
        except BaseException:
            os.close(fd)
            raise
        return _dlopen(fd, lib_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_library(source: Path, flags: tuple[str, ...], what: str) -> ctypes.CDLL | None:
    """``source`` compiled with ``flags`` and loaded, or None (with one warning naming what ``what`` falls back
    to). A cached build is used only if it passes :func:`load_verified`."""
    if not env.kernels_enabled():
        return None
    cxx = compiler()
    if cxx is None:
        warnings.warn(f"no C++ compiler found: {what} use the slower pure-PyTorch path", stacklevel=3)
        return None
    try:
        lib_path = library_path(source, flags, cxx)
        if lib_path.exists() or sidecar(lib_path).exists():
            try:
                return load_verified(lib_path)
            except OSError as e:
                warnings.warn(f"not loading the cached {lib_path.name} ({e}); rebuilding it", stacklevel=3)
        return build_and_load(cxx, source, flags, lib_path)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"building {source.name} failed, {what} use the pure-PyTorch path: {detail[-500:]}",
                      stacklevel=3)
        return None


def configure_qgemm(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare qgemm.cpp's entry points on a loaded library."""
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.dsm_qgemm_int8.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr, i64, c_int]
    lib.dsm_qgemm_int8.restype = None
    lib.dsm_qgemm_int4.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, i64, ptr, i64, c_int]
    lib.dsm_qgemm_int4.restype = None
    lib.dsm_experts.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, c_int, ptr, ptr,
                                c_int, i64, ptr, ptr, ptr, ptr, c_int]
    lib.dsm_experts.restype = None
    lib.dsm_quantize_rows.argtypes = [ptr, i64, i64, i64, ptr, ptr, c_int]
    lib.dsm_quantize_rows.restype = None
    lib.dsm_qgemm_q8.argtypes = [ptr, i64, i64, i64, c_int, ptr, ptr, i64, i64, ptr, i64, c_int]
    lib.dsm_qgemm_q8.restype = None
    lib.dsm_experts_q8.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, c_int, ptr, ptr,
                                   c_int, i64, ptr, ptr, ptr, c_int]
    lib.dsm_experts_q8.restype = None
    lib.dsm_qgrad_int8.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, c_int]
    lib.dsm_qgrad_int8.restype = None
    experts: list[Any] = [i64, ptr, ptr, ptr, ptr, c_int, ptr, ptr, c_int, i64, c_int]  # F, w1, w3, s1, s3, ... q8
    lib.dsm_moe_one_token.argtypes = [ptr, i64, i64, ptr, i64, ptr, c_int, i64, i64, c_int, i64, c_int, ctypes.c_float,
                                      *experts, *experts, ptr, ptr, ptr, ptr, c_int]
    lib.dsm_moe_one_token.restype = c_int
    f32 = ctypes.c_float
    lib.dsm_mla_one_token.argtypes = [ptr, i64, i64, i64, ptr, ptr, f32, i64, i64, i64, i64, i64, ptr, f32, ptr, ptr,
                                      c_int, ptr, i64, i64, ptr, i64, i64, i64, ptr, ptr, ptr, f32, ptr, ptr, ptr, ptr,
                                      c_int]
    lib.dsm_mla_one_token.restype = None
    mla_args = lib.dsm_mla_one_token.argtypes[4:-3]  # proj .. decode_fn
    lib.dsm_block_one_token.argtypes = [ptr, i64, i64, i64, ptr, f32, *mla_args, ptr, f32, ptr,
                                        *lib.dsm_moe_one_token.argtypes[4:-5], ptr, ptr, c_int]
    lib.dsm_block_one_token.restype = c_int
    lib.dsm_qgemm_int8_grouped.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, c_int]
    lib.dsm_qgemm_int8_grouped.restype = None
    for name in ("dsm_isa_supported", "dsm_set_isa"):
        getattr(lib, name).argtypes = [c_int]
        getattr(lib, name).restype = c_int
    for name in ("dsm_best_isa", "dsm_get_isa"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = c_int
    lib.dsm_set_strip_rows.argtypes = [i64]
    lib.dsm_set_strip_rows.restype = i64
    lib.dsm_get_strip_rows.argtypes = []
    lib.dsm_get_strip_rows.restype = i64
    return lib


def set_isa(lib: ctypes.CDLL, isa: str) -> None:
    """Make ``lib`` (a qgemm build) use instruction set ``isa``; ValueError if unknown or not on this CPU."""
    if isa not in ISAS:
        raise ValueError(f"unknown kernel instruction set {isa!r}: expected one of {', '.join(ISAS)}")
    if lib.dsm_set_isa(ISAS.index(isa)) != 0:
        raise ValueError(f"this CPU cannot run the {isa} kernels; it can run: {', '.join(supported_isas(lib))}")


def supported_isas(lib: ctypes.CDLL) -> list[str]:
    return [name for i, name in enumerate(ISAS) if lib.dsm_isa_supported(i)]


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled quantised-matmul kernels, or None (with one warning saying why) when they cannot be had.
    ``DEEPSEEK_MOE_KERNEL_ISA`` picks its instruction set (ValueError naming the variable if this CPU lacks it)."""
    lib = build_library(SOURCE, FLAGS, "quantised matmuls")
    if lib is None:
        return None
    configure_qgemm(lib)
    if (forced := env.kernel_isa()) is not None:
        try:
            set_isa(lib, forced)
        except ValueError as e:
            raise ValueError(f"{env.KERNEL_ISA}={forced}: {e}") from None
    return lib


# float_gemm.cpp's instruction sets, in the order of its dsm_fgemm_set_isa numbers.
FLOAT_GEMM_ISAS = ("scalar", "avx2")


@functools.cache
def load_float_gemm_library() -> ctypes.CDLL | None:
    """The compiled fp32/bf16-weight matmul kernels, or None (with one warning saying why)."""
    lib = build_library(FLOAT_GEMM_SOURCE, FLAGS, "bf16 matmuls and the fused float experts")
    if lib is None:
        return None
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.dsm_fgemm.argtypes = [ptr, i64, i64, i64, ptr, i64, c_int, i64, ptr, i64, c_int]
    lib.dsm_fgemm.restype = None
    lib.dsm_fexperts.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, c_int, ptr, ptr, ptr, ptr,
                                 c_int]
    lib.dsm_fexperts.restype = None
    lib.dsm_fgemm_set_isa.argtypes = [c_int]
    lib.dsm_fgemm_set_isa.restype = c_int
    for name in ("dsm_fgemm_best_isa", "dsm_fgemm_get_isa"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = c_int
    return lib


@functools.cache
def load_mla_decode_library() -> ctypes.CDLL | None:
    """The compiled absorbed-MLA decode step, or None (with one warning saying why)."""
    lib = build_library(MLA_DECODE_SOURCE, FLAGS, "MLA decode steps")
    return None if lib is None else configure_mla_decode(lib)


def configure_mla_decode(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare mla_decode.cpp's entry points on a loaded library."""
    i64, ptr, c_int, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.dsm_mla_decode.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, i64, i64, i64, i64, ptr, i64, i64, ptr, i64, i64,
                                   i64, ptr, ptr, ptr, f32, ptr, ptr, c_int]
    lib.dsm_mla_decode.restype = None
    lib.dsm_mla_prepare.argtypes = [ptr, i64, i64, i64, i64, i64, i64, ptr, f32, ptr, ptr, c_int, ptr, i64, i64, ptr,
                                    i64, i64, ptr, i64, i64, i64, i64, ptr]
    lib.dsm_mla_prepare.restype = None
    return lib


@functools.cache
def load_rms_norm_library() -> ctypes.CDLL | None:
    """The compiled RMSNorm of a few rows, or None (with one warning saying why)."""
    lib = build_library(RMS_NORM_SOURCE, FLAGS, "RMSNorm of decode steps")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dsm_rms_norm.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_float, ptr, i64]
    lib.dsm_rms_norm.restype = None
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
    lib.dsm_adamw_step_bf16_moments.argtypes = [ptr, ptr, ptr, ptr, i64, f32, f32, f32, f32, f32, f32]
    lib.dsm_adamw_step_bf16_moments.restype = None
    return lib
