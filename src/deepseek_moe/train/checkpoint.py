"""Resumable training state under ``RUN_DIR/state/step-N/``, sharded, written atomically, the last N kept.

    .metadata          torch.distributed.checkpoint (DCP): every tensor's global shape and where its shards are
    __R_0.distcp       the shards process R wrote: parameters and buffers ("model"), AdamW's moments and step
                       counts ("optimizer"), torch's generator state and the MoE layers' routing state ("extra")
    trainer.json       written last: format, step, data position, lr scheduler, the optimizer's param groups, python
                       and numpy generator states, and the layout of the "extra" tensors

Keys are the single-process model's; a sharded parameter (a DTensor) is stored as its shards with their global
offsets, so a run saved on N processes resumes on M (DCP reads each process's rows whatever wrote them). Every
process writes its own file into one directory (a filesystem all processes share, as DCP assumes); the directory
is built as a temporary sibling, fsynced and renamed into place, so a crash leaves the whole step or nothing.

State that is not a tensor, and state that must resume the same on any process count, is the same on every
process: the routing biases and generators, torch's generator, the data position. Saving checks it; the pending
routing-bias counts (zero between steps, where checkpoints are taken) are stored summed over processes.

Nothing is unpickled: DCP's ``.metadata`` is read by an allow-list unpickler and tensor payloads by
``torch.load(weights_only=True)`` (``deepseek_moe.parallel.dcp``); the rest is JSON (``state_codec``). Format 2
(whole-model safetensors files) still resumes on one process, and its next checkpoint is format 3.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from deepseek_moe.moe.all_layers import load_routing_state, routing_state
from deepseek_moe.train import state_codec
from deepseek_moe.train.errors import TrainError
from deepseek_moe.train.strategy import SingleProcess, Strategy

FORMAT = 3  # 2: model/optimizer/rng.safetensors of the unsplit model; 1: optimizer.pt and rng.pt, pickled
_PREFIX, _TMP = "step-", ".tmp-step-"
_LEGACY = ("optimizer.pt", "rng.pt")


def step_dirs(state_dir: Path) -> list[Path]:
    """Complete step directories, oldest first (a save in progress or killed is a ``.tmp-step-N`` sibling)."""
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


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """torch's, numpy's and python's generator states, and the generator of ``device`` when it is a GPU (each
    process drives its own GPU, so only its own generator is the same on every process)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def load_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        if isinstance(state["cuda"], list):  # format 2: every visible GPU's
            torch.cuda.set_rng_state_all(state["cuda"])
        elif device is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], device)


# ---- save --------------------------------------------------------------------------------------------------------
def save_checkpoint(state_dir: Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, trainer: dict[str, Any], keep_last: int, strategy: Strategy) -> Path:
    """Every process calls this (a collective); each writes its shards, the main one the rest. Returns once the
    step directory is complete on every process."""
    from deepseek_moe.parallel import dcp

    final, tmp = state_dir / f"{_PREFIX}{step}", state_dir / f"{_TMP}{step}"
    model_state, optimizer_state = strategy.checkpoint_state(model, optimizer)
    extra_tensors, extra_layout = state_codec.encode(_replicated_state(model, strategy))
    _check_same_everywhere(strategy, step, extra_tensors, extra_layout)
    groups_tensors, groups_layout = state_codec.encode(optimizer_state["param_groups"])
    if groups_tensors:
        raise TrainError(f"the optimizer's param groups hold tensors ({sorted(groups_tensors)[:3]}); checkpoints "
                         "store them as JSON")
    with strategy.main_first():
        if strategy.is_main:
            for stale in state_dir.glob(f"{_TMP}*"):  # saves a crash interrupted
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
    dcp.save(tmp, {"model": model_state, "optimizer": optimizer_state["state"], "extra": extra_tensors})
    with strategy.main_first():
        if strategy.is_main:
            info = {"format": FORMAT, "step": step, **trainer, "scheduler": scheduler.state_dict(),
                    "param_groups": groups_layout, "extra": extra_layout}
            (tmp / "trainer.json").write_text(json.dumps(info, indent=1))
            _fsync(tmp / "trainer.json")  # DCP's writer fsynced its own files
            _fsync(tmp)
            if final.exists():  # a re-run of the same step after a crash
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(state_dir)
            for old in step_dirs(state_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _replicated_state(model: nn.Module, strategy: Strategy) -> dict[str, Any]:
    """Generator and routing state, the same on every process (counts summed over them)."""
    routing = routing_state(model)
    for entry in routing.values():
        for counts in ("bias_counts", "capacity_counts"):
            if counts in entry:
                entry[counts] = strategy.sum(entry[counts])
        if entry.get("generator_device") is not None:
            entry["generator_device"] = torch.device(entry["generator_device"]).type  # cuda:R differs per process
    return {"rng": rng_state(strategy.device), "routing": routing}


def _check_same_everywhere(strategy: Strategy, step: int, tensors: dict[str, torch.Tensor], layout: Any) -> None:
    """TrainError on every process when the state stored once differs between processes: resuming on another
    process count could not reproduce the run then. Two small all-reduces."""
    h = hashlib.sha256(json.dumps(layout, sort_keys=True).encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    digest = float(int.from_bytes(h.digest()[:5], "little"))  # 40 bits: sums over processes stay exact
    (mean,) = strategy.mean(digest)
    (differ,) = strategy.mean(float(mean != digest))
    if differ > 0:
        raise TrainError(f"cannot checkpoint step {step}: the generator or routing state differs between processes, "
                         "so the checkpoint could not resume exactly on another process count (a bug: every "
                         "process should draw the same random numbers)")


# ---- load --------------------------------------------------------------------------------------------------------
def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, strategy: Strategy) -> dict[str, Any]:
    """Restore everything in place on any number of processes (a collective); returns trainer.json. Raises
    TrainError naming the file on any mismatch or corruption."""
    from deepseek_moe.parallel import dcp

    info = _read_info(path)
    if info["format"] == 2:
        return _load_format2(path, info, model=model, optimizer=optimizer, scheduler=scheduler, strategy=strategy)
    try:
        stored = dcp.stored(dcp.read_metadata(path))
    except dcp.CheckpointReadError as e:
        raise TrainError(f"checkpoint {e}") from e
    model_state, optimizer_state = strategy.checkpoint_state(model, optimizer)
    _check_shapes(path, stored, model_state)
    # Only the moments the checkpoint has: a parameter that never had a gradient has none.
    optimizer_state["state"] = {
        name: {k: v for k, v in entry.items() if ("optimizer", name, k) in stored}
        for name, entry in optimizer_state["state"].items()}
    optimizer_state["state"] = {k: v for k, v in optimizer_state["state"].items() if v}
    try:
        extra = {name: _empty(*stored[("extra", name)]) for name in _tensor_names(info["extra"])}
    except KeyError as e:
        raise TrainError(f"checkpoint {path} lacks the tensor {e} that trainer.json names") from e
    try:
        dcp.load(path, {"model": model_state, "optimizer": optimizer_state["state"], "extra": extra})
    except dcp.CheckpointReadError as e:
        raise TrainError(f"checkpoint {e}") from e
    try:
        optimizer_state["param_groups"] = state_codec.decode(info["param_groups"], {})
        strategy.load_checkpoint_state(model, optimizer, model_state, optimizer_state)
        scheduler.load_state_dict(info["scheduler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise TrainError(f"checkpoint {path} does not match the optimizer: {e}") from e
    try:
        replicated = state_codec.decode(info["extra"], extra)
        _load_replicated(model, replicated, strategy)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise TrainError(f"checkpoint {path} does not hold this run's generator states: {e}") from e
    return info


def _empty(size: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(size, dtype=dtype)


def _check_shapes(path: Path, stored: dict[tuple[str, ...], Any], model_state: dict[str, Any]) -> None:
    have = {p[1]: list(size) for p, (size, _) in stored.items() if len(p) == 2 and p[0] == "model"}
    want = {k: list(v.shape) for k, v in model_state.items()}  # a DTensor's shape is the global one
    if have != want:
        diff = sorted(set(have) ^ set(want)) or sorted(k for k in want if have.get(k) != want[k])
        first = diff[0] if diff else "?"
        raise TrainError(f"checkpoint {path} does not match the model built from the run's config (first "
                         f"difference: {first}: stored {have.get(first)}, model {want.get(first)}); was "
                         "config.json edited?")


def _tensor_names(skeleton: Any) -> list[str]:
    if isinstance(skeleton, list):
        return [n for v in skeleton for n in _tensor_names(v)]
    if isinstance(skeleton, dict):
        if "$tensor" in skeleton:
            return [str(skeleton["$tensor"])]
        return [n for v in skeleton.values() for n in _tensor_names(v)]
    return []


def _load_replicated(model: nn.Module, state: dict[str, Any], strategy: Strategy) -> None:
    routing = state["routing"]
    for entry in routing.values():
        for counts in ("bias_counts", "capacity_counts"):
            if counts in entry and not strategy.is_main:
                entry[counts] = torch.zeros_like(entry[counts])  # the sum lives on one process
        kind = entry.get("generator_device")
        if kind is not None and torch.device(kind).type == strategy.device.type:
            entry["generator_device"] = str(strategy.device)
    load_rng_state(state["rng"], strategy.device)
    load_routing_state(model, routing)


def read_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's tensors (the single-process state_dict) of a step directory, read by this process alone,
    all in memory: for inspection, tests and exporting one step."""
    info = _read_info(path)
    if info["format"] == 2:
        return _tensors(path / "model.safetensors")
    from deepseek_moe.parallel import dcp

    try:
        return dcp.read_full(path, "model")
    except dcp.CheckpointReadError as e:
        raise TrainError(f"checkpoint {e}") from e


def _read_info(path: Path) -> dict[str, Any]:
    legacy = [name for name in _LEGACY if (path / name).exists()]
    try:
        info = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"checkpoint {path / 'trainer.json'} is unreadable or corrupt: {e}") from e
    if legacy or not isinstance(info, dict) or info.get("format") not in (2, FORMAT):
        found = f" ({', '.join(legacy)})" if legacy else ""
        raise TrainError(
            f"checkpoint {path} is not in this version's format{found}: deepseek_moe used to pickle optimizer and "
            "generator state, and loading a pickle can run code planted in the run directory, so it is not read. "
            "Start the run again, or finish it with the deepseek_moe version that wrote it")
    return info


# ---- format 2: the unsplit model in safetensors files, one process -----------------------------------------------
def _load_format2(path: Path, info: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Any, strategy: Strategy) -> dict[str, Any]:
    if not isinstance(strategy, SingleProcess):
        raise TrainError(f"checkpoint {path} is in format 2 (whole-model safetensors files, before sharded DCP "
                         "checkpoints), which resumes on one process only: resume it without --nproc for at least "
                         "one checkpoint interval; its next checkpoint is format 3 and resumes on any number")
    want, have = {k: list(v.shape) for k, v in model.state_dict().items()}, info.get("fingerprint", {})
    if have != want:
        diff = sorted(set(have) ^ set(want)) or sorted(k for k in want if have.get(k) != want[k])
        raise TrainError(f"checkpoint {path} does not match the model built from the run's config "
                         f"(first difference: {diff[0] if diff else '?'}); was config.json edited?")
    try:
        missing, unexpected = model.load_state_dict(_tensors(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    except (ValueError, RuntimeError) as e:
        raise TrainError(f"checkpoint {path / 'model.safetensors'} does not match the model: {e}") from e
    try:
        optimizer.load_state_dict(state_codec.decode(info["optimizer"], _tensors(path / "optimizer.safetensors")))
        scheduler.load_state_dict(info["scheduler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise TrainError(f"checkpoint {path / 'optimizer.safetensors'} does not match the optimizer: {e}") from e
    try:
        rng = state_codec.decode(info["rng"], _tensors(path / "rng.safetensors"))
        load_rng_state(rng["global"], strategy.device)
        load_routing_state(model, rng["routing"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise TrainError(f"checkpoint {path / 'rng.safetensors'} does not hold this run's generator states: "
                         f"{e}") from e
    return info


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise TrainError(f"checkpoint {path} is unreadable or corrupt: {e}") from e


__all__ = ["FORMAT", "load_checkpoint", "read_model_state", "save_checkpoint", "step_dirs"]
