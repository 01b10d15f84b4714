"""Resumable training state under ``RUN_DIR/state/step-N/``, written atomically, the last N kept.

    model.safetensors      parameters and buffers (the routing biases included)
    optimizer.safetensors  the optimizer's tensors (AdamW's moments and step counts)
    rng.safetensors        torch's (and CUDA's) generator states as uint8 tensors; the MoE layers' routing state
    trainer.json           written last: format, step, data position, lr scheduler, python and numpy generator
                           states, the layout of the other files' tensors, and the model's shapes

Nothing is pickled, so resuming a run directory someone else wrote cannot run their code: the tensor files are
safetensors and the rest is JSON (``state_codec``). A step directory is built in a temporary sibling, fsynced
and renamed into place, so a crash leaves either the whole step or nothing.

The strategy (``train.strategy``) gives the state of the unsplit model, so the files do not depend on the
process count, and takes each process's part on load.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deepseek_moe.moe.all_layers import load_routing_state, routing_state
from deepseek_moe.train import state_codec
from deepseek_moe.train.errors import TrainError
from deepseek_moe.train.strategy import Strategy

FORMAT = 2  # 1: optimizer.pt and rng.pt, pickled
_PREFIX = "step-"
_LEGACY = ("optimizer.pt", "rng.pt")


def step_dirs(state_dir: Path) -> list[Path]:
    """Complete step directories, oldest first."""
    if not state_dir.is_dir():
        return []
    found = [p for p in state_dir.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
             and p.name[len(_PREFIX):].isdigit() and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state_dir: Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, trainer: dict[str, Any], keep_last: int, strategy: Strategy) -> Path:
    """Every process calls this (gathering the state is a collective); the main one writes."""
    final = state_dir / f"{_PREFIX}{step}"
    model_state, optimizer_state = strategy.full_states(model, optimizer)
    if not strategy.is_main:
        return final
    tmp = state_dir / f".tmp-{_PREFIX}{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # Tied weights appear twice in state_dict; safetensors refuses shared storage, so clone each tensor.
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in model_state.items()},
              str(tmp / "model.safetensors"))
    optimizer_tensors, optimizer_layout = state_codec.encode(optimizer_state)
    save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
    # torch's generator states go to the tensor file, numpy's and python's (numbers) into trainer.json
    rng_tensors, rng_layout = state_codec.encode({"global": rng_state(), "routing": routing_state(model)})
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    info = {"format": FORMAT, "step": step, **trainer, "scheduler": scheduler.state_dict(),
            "optimizer": optimizer_layout, "rng": rng_layout,
            "fingerprint": {k: list(v.shape) for k, v in model_state.items()}}
    (tmp / "trainer.json").write_text(json.dumps(info, indent=1))
    for p in tmp.iterdir():
        _fsync(p)
    _fsync(tmp)
    if final.exists():  # a re-run of the same step after a crash
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(state_dir)
    for old in step_dirs(state_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, strategy: Strategy) -> dict[str, Any]:
    """Restore everything in place; returns trainer.json. Raises TrainError naming the file on any mismatch."""
    info = _read_info(path)
    want, have = strategy.full_shapes(model), info.get("fingerprint", {})
    if have != want:
        diff = sorted(set(have) ^ set(want)) or sorted(k for k in want if have.get(k) != want[k])
        raise TrainError(f"checkpoint {path} does not match the model built from the run's config "
                         f"(first difference: {diff[0] if diff else '?'}); was config.json edited?")
    try:
        strategy.load_model_state(model, _tensors(path / "model.safetensors"))
    except (ValueError, RuntimeError) as e:
        raise TrainError(f"checkpoint {path / 'model.safetensors'} does not match the model: {e}") from e
    try:
        optimizer_state = state_codec.decode(info["optimizer"], _tensors(path / "optimizer.safetensors"))
        strategy.load_optimizer_state(model, optimizer, optimizer_state)
        scheduler.load_state_dict(info["scheduler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise TrainError(f"checkpoint {path / 'optimizer.safetensors'} does not match the optimizer: {e}") from e
    try:
        rng = state_codec.decode(info["rng"], _tensors(path / "rng.safetensors"))
        load_rng_state(rng["global"])
        load_routing_state(model, rng["routing"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise TrainError(f"checkpoint {path / 'rng.safetensors'} does not hold this run's generator states: "
                         f"{e}") from e
    return info


def _read_info(path: Path) -> dict[str, Any]:
    legacy = [name for name in _LEGACY if (path / name).exists()]
    try:
        info = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"checkpoint {path / 'trainer.json'} is unreadable or corrupt: {e}") from e
    if legacy or not isinstance(info, dict) or info.get("format") != FORMAT:
        found = f" ({', '.join(legacy)})" if legacy else ""
        raise TrainError(
            f"checkpoint {path} is not in this version's format{found}: deepseek_moe used to pickle optimizer and "
            "generator state, and loading a pickle can run code planted in the run directory, so it is not read. "
            "Start the run again, or finish it with the deepseek_moe version that wrote it")
    return info


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise TrainError(f"checkpoint {path} is unreadable or corrupt: {e}") from e


__all__ = ["FORMAT", "load_checkpoint", "save_checkpoint", "step_dirs"]
