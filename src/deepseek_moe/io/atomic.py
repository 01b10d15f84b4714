"""Writing a checkpoint directory so that a reader sees the old one or the new one, never a mix of both.

The new directory is built beside the target (``staged_checkpoint``), then swapped with it in one step: Linux's
``renameat2(RENAME_EXCHANGE)`` exchanges two directory entries atomically, so there is no moment at which the
path is missing or half written. Where the exchange is not available (another OS, a file system without it) the
old directory is renamed aside and the new one renamed in: then, for the moment between the two renames, the
path does not exist (a reader fails; it never reads a mix). Files in the old directory that the new checkpoint
does not write (a README, tokenizer_config.json, a subdirectory) are carried over: hard-linked into the stage before
the swap (copied where links are impossible).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directory entries ``a`` and ``b`` (both must exist); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage_path(final: Path, token: str | None = None) -> Path:
    """Where the new version of ``final`` is built: a hidden sibling (same file system, so renames work)."""
    return final.parent / f".{final.name}.tmp-{token or f'{os.getpid()}-{time.time_ns()}'}"


def _link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def replace_directory(stage: Path, final: Path, *, replaces: Callable[[str], bool]) -> None:
    """Put the complete directory ``stage`` at ``final`` in one step (see the module docstring). Entries of an
    existing ``final`` for which ``replaces(name)`` is False and that ``stage`` lacks are carried over."""
    for p in stage.iterdir():
        if p.is_file():
            fsync_path(p)
    if final.is_symlink():
        final = final.resolve()  # swap the directory the link names, keep the link
    if not final.exists():
        os.rename(stage, final)
        fsync_path(final.parent)
        return
    if not final.is_dir():
        raise NotADirectoryError(f"{final} exists and is not a directory")
    for p in final.iterdir():
        if replaces(p.name) or (stage / p.name).exists():
            continue
        if p.is_dir() and not p.is_symlink():  # a tree of links to the same files
            shutil.copytree(p, stage / p.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(p, stage / p.name)
    if exchange(stage, final):
        old = stage  # the exchange left the old directory at the stage's path
    else:
        old = stage_path(final)
        os.rename(final, old)
        try:
            os.rename(stage, final)
        except BaseException:
            os.rename(old, final)  # put the old one back rather than leave nothing
            raise
    try:
        fsync_path(final.parent)
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_checkpoint(final: Path, *, replaces: Callable[[str], bool]) -> Iterator[Path]:
    """A fresh directory beside ``final`` to write the new checkpoint into; on success it replaces ``final`` in
    one step (:func:`replace_directory`), on any failure it is removed and ``final`` is left as it was."""
    if final.is_symlink():
        final = final.resolve()  # built beside the directory the link names: one file system
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = stage_path(final)
    stage.mkdir()
    try:
        yield stage
        replace_directory(stage, final, replaces=replaces)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


__all__ = ["exchange", "fsync_path", "replace_directory", "stage_path", "staged_checkpoint"]
