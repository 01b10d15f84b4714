"""Where a checkpoint is: the directory a user names may be the checkpoint or a train run directory holding one."""

from __future__ import annotations

import os
from pathlib import Path

from deepseek_moe.io.streaming import CheckpointError


def checkpoint_dir(target: str | os.PathLike[str]) -> Path:
    """The directory holding config.json: ``target`` itself, or ``target/model`` for a train run directory.
    Raises CheckpointError naming the path when neither holds one."""
    path = Path(target)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint directory with config.json)")
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (nor model/config.json, as a train run directory has)")
    return path


__all__ = ["checkpoint_dir"]
