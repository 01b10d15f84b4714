"""The compiled-kernel cache cannot be planted: a library someone else put where ours is expected never runs.

Each planted library's constructor writes a marker file; after loading through ``cpu_build`` the marker must not
exist, and (the positive control that keeps these tests honest) loading the planted file directly writes it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from deepseek_moe.kernels import cpu_build

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the kernels")

ADAMW = (cpu_build.ADAMW_SOURCE, cpu_build.ADAMW_FLAGS)  # builds in ~0.2 s: most tests use it
QGEMM = (cpu_build.SOURCE, cpu_build.FLAGS)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh DEEPSEEK_MOE_CACHE for this test; returns its kernels/ directory (not yet created)."""
    monkeypatch.setenv("DEEPSEEK_MOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", shutil.which("g++") or "g++")
    monkeypatch.delenv("DEEPSEEK_MOE_KERNELS", raising=False)
    cpu_build._fallback_dir.cache_clear()
    cpu_build._warn_once.cache_clear()
    return tmp_path / "cache" / "kernels"


def _plant(at: Path, marker: Path) -> bytes:
    """Compile, to ``at``, a library whose constructor writes ``marker``; its bytes."""
    src = at.with_name("planted.c")
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void planted(void) {\n'
                   f'    FILE* f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}\n}}\n')
    subprocess.run(["gcc", "-shared", "-fPIC", str(src), "-o", str(at)], check=True, capture_output=True)
    src.unlink()
    return at.read_bytes()


def _expected_path(source: Path, flags: tuple[str, ...]) -> Path:
    return cpu_build.library_path(source, flags, os.environ["CXX"])


def _build(source: Path, flags: tuple[str, ...]) -> ctypes.CDLL | None:
    return cpu_build.build_library(source, flags, "test kernels")


def _positive_control(planted: bytes, tmp_path: Path, marker: Path) -> None:
    """The planted library really does run its constructor when loaded directly."""
    copy = tmp_path / "control.so"
    copy.write_bytes(planted)
    ctypes.CDLL(str(copy))
    assert marker.read_text() == "ran"


def test_cache_directory_is_created_private(cache: Path) -> None:
    assert _build(*ADAMW) is not None
    st = cache.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    lib = next(cache.glob("adamw-*.so"))
    digest = (cache / (lib.name + ".sha256")).read_text().strip()
    assert digest == hashlib.sha256(lib.read_bytes()).hexdigest()


@pytest.mark.parametrize("kernel", [ADAMW, QGEMM], ids=["adamw", "qgemm"])
def test_planted_library_without_a_recorded_hash_is_rebuilt_not_run(
        kernel: tuple[Path, tuple[str, ...]], cache: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    cache.mkdir(parents=True, mode=0o700)
    target = _expected_path(*kernel)
    planted = _plant(target, marker)
    with pytest.warns(UserWarning, match="not loading the cached"):
        lib = _build(*kernel)
    assert lib is not None and not marker.exists()
    assert target.read_bytes() != planted  # replaced by a real build, with its hash recorded
    assert (cache / (target.name + ".sha256")).read_text().strip() == hashlib.sha256(target.read_bytes()).hexdigest()
    _positive_control(planted, tmp_path, marker)


def test_library_swapped_after_a_good_build_fails_its_hash_and_is_rebuilt(cache: Path, tmp_path: Path) -> None:
    assert _build(*ADAMW) is not None
    marker = tmp_path / "marker"
    target = _expected_path(*ADAMW)
    planted = _plant(tmp_path / "planted.so", marker)
    os.replace(tmp_path / "planted.so", target)  # the sidecar still holds the good build's hash
    with pytest.warns(UserWarning, match="has SHA-256 .* its build recorded"):
        assert _build(*ADAMW) is not None
    assert not marker.exists()
    _positive_control(planted, tmp_path, marker)


def test_group_writable_library_is_refused_even_with_a_matching_hash(cache: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    cache.mkdir(parents=True, mode=0o700)
    target = _expected_path(*ADAMW)
    planted = _plant(target, marker)
    (cache / (target.name + ".sha256")).write_text(hashlib.sha256(planted).hexdigest())
    target.chmod(0o777)
    with pytest.warns(UserWarning, match="writable by group or others"):
        assert _build(*ADAMW) is not None
    assert not marker.exists()
    _positive_control(planted, tmp_path, marker)


def test_shared_cache_directory_is_not_used(cache: Path, tmp_path: Path) -> None:
    """A directory others may write is refused (with a warning naming it) even if what is in it looks right:
    whoever can write there can also write a matching hash."""
    marker = tmp_path / "marker"
    cache.mkdir(parents=True)
    cache.chmod(0o777)
    with pytest.warns(UserWarning, match=f"not using the kernel cache: {cache} is writable by group or others"):
        fallback = cpu_build.cache_dir()
    assert fallback != cache and stat.S_IMODE(fallback.stat().st_mode) == 0o700
    target = cache / _expected_path(*ADAMW).name
    planted = _plant(target, marker)
    (cache / (target.name + ".sha256")).write_text(hashlib.sha256(planted).hexdigest())
    assert _build(*ADAMW) is not None
    assert not marker.exists() and list(fallback.glob("adamw-*.so"))
    _positive_control(planted, tmp_path, marker)


def test_cache_directory_owned_by_someone_else_is_not_used(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache.mkdir(parents=True, mode=0o700)
    monkeypatch.setattr(cpu_build, "_uid", lambda: os.getuid() + 1)  # as if another user owned it
    with pytest.warns(UserWarning, match=f"{cache} is owned by uid {os.getuid()}, not by this user"):
        assert cpu_build.cache_dir() != cache


def test_symlinked_cache_directory_is_not_used(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    cache.parent.mkdir(parents=True)
    cache.symlink_to(tmp_path / "elsewhere")
    with pytest.warns(UserWarning, match="is not a directory"):
        assert cpu_build.cache_dir() != cache


def test_symlinked_library_is_not_followed(cache: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    cache.mkdir(parents=True, mode=0o700)
    planted = _plant(tmp_path / "planted.so", marker)
    target = _expected_path(*ADAMW)
    target.symlink_to(tmp_path / "planted.so")
    (cache / (target.name + ".sha256")).write_text(hashlib.sha256(planted).hexdigest())
    with pytest.warns(UserWarning, match="not loading the cached"):
        assert _build(*ADAMW) is not None
    assert not marker.exists()
