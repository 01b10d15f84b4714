"""Sharded, reshardable training state with torch.distributed.checkpoint (DCP), read without running anything a
checkpoint directory could plant.

    model_state, optim_state = state_dicts(model, optimizer)   what DCP saves and loads into, in place
    save(path, tensors)                  a collective: each rank writes its shards, one ``__R_0.distcp`` file per
                                         rank, and the coordinator ``.metadata`` (works without a process group)
    read_metadata(path)                  the global shape and dtype of every stored tensor
    load(path, tensors)                  fills ``tensors`` (DTensors: this rank's shard only) on any process count
    put_state_dicts(model, optimizer, model_state, optim_state)

State dicts carry the single-process model's keys; a parameter that is a DTensor stays one (its optimizer moments
too), so DCP stores each shard once with its global offset and a different process count reads the rows it owns.
Plain tensors are taken as equal on every rank (DCP writes one copy).

Safety: DCP's FileSystemReader reads ``.metadata`` with a bare ``pickle.load`` and non-tensor entries with
``torch.load(weights_only=False)``: either would run code planted in a checkpoint. So we store tensors only (the
rest goes to JSON beside them), read ``.metadata`` with an unpickler that builds nothing but DCP's metadata
classes, ``torch.Size``, dtypes and paths, and refuse any non-tensor entry. Tensor payloads are read by
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

METADATA = ".metadata"

_META = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    *((_META, name) for name in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
                                  "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a lookup of torch's layouts by name
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
}


class CheckpointReadError(ValueError):
    """A DCP checkpoint that is missing, corrupt, holds something other than tensors, or does not fit; the
    message names the file."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in the metadata of a tensors-only checkpoint, "
                                     "so it is not built")


def read_metadata(path: Path) -> Metadata:
    """The checkpoint's ``.metadata``, built with an allow-list unpickler and checked to describe tensors only."""
    file = Path(path) / METADATA
    try:
        with open(file, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError as e:
        raise CheckpointReadError(f"{file} is missing: not a complete DCP checkpoint") from e
    except Exception as e:  # noqa: BLE001  (any unpickling failure means a corrupt or tampered file)
        raise CheckpointReadError(f"{file} is unreadable or not DCP metadata: {e}") from e
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointReadError(f"{file} is not DCP metadata (it holds a {type(md).__name__})")
    other = [k for k, v in md.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
    if other:
        raise CheckpointReadError(f"{file} lists non-tensor entries ({other[:3]}); these checkpoints hold tensors "
                                  "only, and reading other entries would unpickle them")
    return md


class _SafeReader(FileSystemReader):
    """Reads the metadata with :func:`read_metadata` and the data one file at a time, so a read error names its
    file (through the public reader interface: the plan's items and the metadata's storage_data)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.files: dict[Any, Any] = {}

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self.files = metadata.storage_data

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = read_metadata(Path(self.path))
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan: LoadPlan, planner: Any) -> Any:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.files[item.storage_index].relative_path, []).append(item)
        done = None
        for relative_path, items in per_file.items():
            try:
                done = super().read_data(dataclasses.replace(plan, items=items), planner)
            except Exception as e:  # noqa: BLE001  (torch.load's refusals, short files, size mismatches)
                raise CheckpointReadError(f"{Path(self.path) / relative_path} is unreadable or corrupt "
                                          f"({type(e).__name__}: {e})") from e
        return done if done is not None else super().read_data(plan, planner)


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointReadError(f"entry {read_item.dest_index.fqn!r} is not a tensor; it is not unpickled")


def _check_tensors(tree: Any, where: str = "") -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _check_tensors(v, f"{where}.{k}" if where else str(k))
    elif not isinstance(tree, torch.Tensor):
        raise TypeError(f"state entry {where!r} is a {type(tree).__name__}: DCP checkpoints here hold tensors only "
                        "(put numbers and strings in the JSON beside them)")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():  # one process without a process group is intended, not a mistake
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def save(path: Path, tensors: dict[str, Any]) -> None:
    """Write ``tensors`` (nested dicts of tensors) into the directory ``path``; every rank calls this. Files are
    fsynced; the caller makes the directory visible atomically."""
    _check_tensors(tensors)
    writer = FileSystemWriter(path, single_file_per_rank=True, sync_files=True)
    with _quiet():
        try:
            dcp.save(tensors, storage_writer=writer, no_dist=not dist.is_initialized())
        except CheckpointException as e:  # a BaseException: make it an error callers catch
            raise RuntimeError(f"saving the checkpoint into {path} failed: {_first_line(e)}") from e


def load(path: Path, tensors: dict[str, Any]) -> None:
    """Fill ``tensors`` (same nesting as saved; every entry must be in the checkpoint) in place from ``path``."""
    _check_tensors(tensors)
    _dcp_load(path, tensors, no_dist=not dist.is_initialized())


def _dcp_load(path: Path, tensors: dict[str, Any], *, no_dist: bool) -> None:
    with _quiet():
        try:
            dcp.load(tensors, storage_reader=_SafeReader(path), planner=_TensorsOnlyPlanner(), no_dist=no_dist)
        except CheckpointReadError:
            raise
        except (Exception, CheckpointException) as e:  # DCP wraps each rank's failure in a CheckpointException
            ours = [f[0] for f in getattr(e, "failures", {}).values()
                    if isinstance(f, tuple) and isinstance(f[0], CheckpointReadError)]
            if ours:
                raise ours[0] from e
            raise CheckpointReadError(f"checkpoint {path} could not be loaded: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e)
    # A CheckpointException lists each rank's traceback; the error that matters is the innermost line.
    for line in reversed(text.splitlines()):
        if "Error" in line and ":" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(e).__name__


def state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state, optimizer state) keyed by parameter names: ``{"state": {name: {"exp_avg": ...}},
    "param_groups": [{..., "params": [names]}]}``. A fresh optimizer's state is allocated first (one step with
    zero gradients at lr 0), so the result can be loaded into."""
    return get_state_dict(model, optimizer, options=StateDictOptions())


def put_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                    optimizer_state: dict[str, Any]) -> None:
    """Load the filled-in :func:`state_dicts`. Not strict: a parameter that never had a gradient (the router
    under uniform routing, frozen experts) has no optimizer state, as in the run that saved it; the caller checks
    that the model's keys and shapes match."""
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(strict=False))


def stored(md: Metadata) -> dict[tuple[str, ...], tuple[torch.Size, torch.dtype]]:
    """Every stored tensor's path in the saved nested dict -> (global shape, dtype)."""
    out: dict[tuple[str, ...], tuple[torch.Size, torch.dtype]] = {}
    for fqn, entry in md.state_dict_metadata.items():
        assert isinstance(entry, TensorStorageMetadata)  # read_metadata refused anything else
        path = (md.planner_data or {}).get(fqn, (fqn,))
        out[tuple(str(p) for p in path)] = (entry.size, entry.properties.dtype)
    return out


def read_full(path: Path, top: str) -> dict[str, torch.Tensor]:
    """The whole tensors saved under ``tensors[top]``, keyed by their path below it joined with "/" (the model's
    keys as they are), read by this process alone (no collective): for tests, inspection and export on one
    process. Holds all of them in memory at once."""
    md = read_metadata(path)
    flat = {p[1:]: torch.empty(size, dtype=dtype) for p, (size, dtype) in stored(md).items() if p[0] == top}
    if not flat:
        raise CheckpointReadError(f"{Path(path) / METADATA} holds no {top!r} tensors")
    nested: dict[str, Any] = {}
    for keys, t in flat.items():
        node = nested
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = t
    _dcp_load(path, {top: nested}, no_dist=True)
    return {"/".join(keys): t for keys, t in flat.items()}


__all__ = ["METADATA", "CheckpointReadError", "load", "put_state_dicts", "read_full", "read_metadata", "save",
           "state_dicts", "stored"]
