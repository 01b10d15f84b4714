"""Resumable training state under ``RUN_DIR/state/step-N/``, written atomically, the last N kept.

A step directory holds ``model.safetensors`` (parameters and buffers, routing biases included),
``optimizer.pt`` (optimizer and lr-scheduler state), ``rng.pt`` (torch, numpy, python and the MoE layers'
routing generators) and ``trainer.json`` (step, data position, and a fingerprint of the model shapes), written
last. It is built in a temporary sibling, fsynced, and renamed into place, so a crash leaves either the whole
step or nothing.

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
from deepseek_moe.train.errors import TrainError
from deepseek_moe.train.strategy import Strategy

_PREFIX = "step-"


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
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
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
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model_state.items()}
    save_file(tensors, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    torch.save({"global": rng_state(), "routing": routing_state(model)}, tmp / "rng.pt")
    info = {"step": step, "fingerprint": {k: list(v.shape) for k, v in model_state.items()}, **trainer}
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
    try:
        info = json.loads((path / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"checkpoint {path / 'trainer.json'} is unreadable or corrupt: {e}") from e
    want = strategy.full_shapes(model)
    have = info.get("fingerprint", {})
    if have != want:
        diff = sorted(set(have) ^ set(want)) or sorted(k for k in want if have.get(k) != want[k])
        raise TrainError(f"checkpoint {path} does not match the model built from the run's config "
                         f"(first difference: {diff[0] if diff else '?'}); was config.json edited?")
    try:
        tensors = load_file(str(path / "model.safetensors"))
    except (OSError, SafetensorError) as e:
        raise TrainError(f"checkpoint {path / 'model.safetensors'} is unreadable or corrupt: {e}") from e
    try:
        strategy.load_model_state(model, tensors)
    except (ValueError, RuntimeError) as e:
        raise TrainError(f"checkpoint {path / 'model.safetensors'} does not match the model: {e}") from e
    for name in ("optimizer.pt", "rng.pt"):
        try:
            blob = torch.load(path / name, weights_only=False)
        except Exception as e:  # torch raises many types for a truncated or foreign file
            raise TrainError(f"checkpoint {path / name} is unreadable or corrupt: {e}") from e
        if name == "optimizer.pt":
            strategy.load_optimizer_state(model, optimizer, blob["optimizer"])
            scheduler.load_state_dict(blob["scheduler"])
        else:
            load_rng_state(blob["global"])
            load_routing_state(model, blob["routing"])
    return info


__all__ = ["load_checkpoint", "save_checkpoint", "step_dirs"]
