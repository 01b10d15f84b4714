"""Hugging Face checkpoints in and out of a model laid out over processes, without any rank holding it whole.

    model = build on meta, lay out (``shard_model``: FSDP2 + expert parallelism), then
    load_pretrained_sharded(model, path)   each rank allocates its shards and reads only their boxes
    save_pretrained_sharded(model, path)   each rank writes what it holds; nothing is gathered whole

Any layout is read the same way: a parameter that is a DTensor is held as the box of its global tensor given by
``compute_local_shape_and_global_offset`` (what DCP uses too: Shard, uneven Shard, _StridedShard of FSDP2 over an
expert-parallel dimension, Shard(1)); any other tensor is whole on every rank. The loader is the streaming loader
(io/streaming.py) told which box each tensor is (:class:`deepseek_moe.io.streaming.Shard`).

Saving writes exactly the files ``save_pretrained`` writes for the single-process model, tensor for tensor, split
over several safetensors files listed by ``model.safetensors.index.json``: every tensor of the checkpoint (one
expert's matrix in the Hugging Face layout) is written by a rank that holds it whole when one does (the ranks'
loads balanced in bytes), else gathered onto one rank alone, one tensor at a time, from the ranks holding its
parts. Each writing rank streams its own file; rank 0 writes the index, config.json and tokenizer.json. The
directory is built beside the target and swapped into place in one step (io/atomic.py), so a reader sees the old
one or the new one, never a mix or nothing.
All ranks must see the same file system (one machine, or a shared one).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from deepseek_moe.io.streaming import Shard
from deepseek_moe.parallel._torch_compat import compute_local_shape_and_global_offset

if TYPE_CHECKING:
    from deepseek_moe.io.save import Entry
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM


def local_shards(model: nn.Module) -> dict[str, Shard]:
    """The box of the global tensor this rank holds, for every parameter and persistent buffer of ``model``
    (its state_dict names: FSDP2 keeps the single-process ones). Local tensors must be allocated."""
    shards: dict[str, Shard] = {}
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not isinstance(tensor, DTensor):
                shards[name] = Shard.whole(tensor.detach())
                continue
            shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
            local = tensor.to_local()
            if tuple(local.shape) != tuple(shape):
                raise ValueError(f"{name}: local tensor {list(local.shape)} is not the shard {list(shape)} its "
                                 f"placements {tensor.placements} give")
            if not offset:  # a rank outside the DTensor's mesh holds nothing of it
                offset = (0,) * tensor.dim()
            shards[name] = Shard(local, tuple(offset), tuple(tensor.shape))
    return shards


def load_pretrained_sharded(model: DeepSeekMoEForCausalLM, path: str | os.PathLike[str], *,
                            device: str | torch.device = "cpu") -> DeepSeekMoEForCausalLM:
    """Fill ``model`` (built on meta, then laid out over the ranks while still on meta) from the checkpoint at
    ``path``: each rank allocates only its shards (``to_empty``) and reads only their boxes from the files.

    No collective is called; every rank may load at its own pace. Each tensor keeps the dtype the model declares.
    Returns ``model``."""
    from deepseek_moe.io.load import load_into

    if any(t.device.type == "meta" for t in model.state_dict(keep_vars=True).values()):
        model.to_empty(device=device)
    load_into(model, path, shards=local_shards(model))
    return model


# ---------------------------------------------------------------------------------------------------------- save

@dataclass(frozen=True)
class _Piece:
    """Part of one checkpoint tensor that one rank sends to the writer: the box ``offset`` + ``shape`` of it."""

    rank: int
    offset: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass
class _Job:
    entry: Entry
    writer: int
    pieces: list[_Piece] | None  # None: the writer holds the whole tensor


def _region(entry: Entry, shard_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset, shape) of ``entry`` in its tensor's global box."""
    if entry.expert is None:
        return (0,) * len(shard_shape), shard_shape
    return (entry.expert, *([0] * (len(shard_shape) - 1))), (1, *shard_shape[1:])


def _overlap(a_off: tuple[int, ...], a_shape: tuple[int, ...], b_off: tuple[int, ...],
             b_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    lo = tuple(max(a, b) for a, b in zip(a_off, b_off, strict=True))
    hi = tuple(min(a + n, b + m) for a, n, b, m in zip(a_off, a_shape, b_off, b_shape, strict=True))
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        return None
    return lo, tuple(h - low for low, h in zip(lo, hi, strict=True))


def _plan_jobs(entries: list[Entry], boxes: list[dict[str, tuple[tuple[int, ...], tuple[int, ...]]]],
               shapes: dict[str, tuple[int, ...]]) -> list[_Job]:
    """Who writes each entry, and from which ranks' pieces (the same answer on every rank: it depends only on
    the gathered boxes). A rank holding the entry whole writes it, the least loaded in bytes of those that do;
    otherwise the least loaded rank gathers it; among ranks holding the same box (replicas), the first sends."""
    world = len(boxes)
    load = [0] * world
    jobs: list[_Job] = []
    for entry in entries:
        if entry.name is None:  # a constant of the format
            writer = min(range(world), key=lambda r: (load[r], r))
            jobs.append(_Job(entry, writer, None))
            load[writer] += entry.nbytes
            continue
        shape = shapes[entry.name]
        offset, region = _region(entry, shape)
        holders = [r for r in range(world) if (o := _overlap(*boxes[r][entry.name], offset, region)) is not None
                   and o[1] == region]
        if holders:
            writer = min(holders, key=lambda r: (load[r], r))
            jobs.append(_Job(entry, writer, None))
        else:
            writer = min(range(world), key=lambda r: (load[r], r))
            pieces, seen = [], set()
            for r in range(world):
                box = boxes[r][entry.name]
                part = _overlap(*box, offset, region)
                if part is None or box in seen:
                    continue
                seen.add(box)
                pieces.append(_Piece(r, part[0], part[1]))
            jobs.append(_Job(entry, writer, pieces))
        load[writer] += entry.nbytes
    return jobs


def _box(shard: Shard, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """The part of ``shard.local`` at global ``offset`` + ``shape``."""
    return shard.local[tuple(slice(o - s, o - s + n) for o, s, n in zip(offset, shard.offset, shape, strict=True))]


def _entry_data(job: _Job, shards: dict[str, Shard], rank: int) -> torch.Tensor | None:
    """Take part in ``job``: send this rank's piece, or (on the writer) assemble and return the tensor."""
    entry = job.entry
    if entry.value is not None:
        return entry.value if rank == job.writer else None
    assert entry.name is not None
    shard = shards[entry.name]
    offset, region = _region(entry, shard.shape)
    if job.pieces is None:
        if rank != job.writer:
            return None
        data = _box(shard, offset, region)
        return data[0] if entry.expert is not None else data
    if rank != job.writer:
        for piece in job.pieces:
            if piece.rank == rank:
                dist.send(_box(shard, piece.offset, piece.shape).contiguous(), dst=job.writer)
        return None
    full = torch.empty(region, dtype=entry.dtype, device=shard.local.device)
    for piece in job.pieces:
        if piece.rank == rank:
            part = _box(shard, piece.offset, piece.shape)
        else:
            part = torch.empty(piece.shape, dtype=entry.dtype, device=shard.local.device)
            dist.recv(part, src=piece.rank)
        full[tuple(slice(o - b, o - b + n) for o, b, n in zip(piece.offset, offset, piece.shape, strict=True))] = part
    return full[0] if entry.expert is not None else full


def save_pretrained_sharded(model: DeepSeekMoEForCausalLM, path: str | os.PathLike[str]) -> str:
    """Write the Hugging Face checkpoint of ``model`` (laid out over the ranks) to ``path``: a collective, every
    rank calls it. The tensors equal those ``save_pretrained`` writes for the same weights on one process (see the
    module docstring for who writes what); without a process group (or with one process) it is
    ``save_pretrained``. Returns the format written (``save_pretrained``'s)."""
    from deepseek_moe.io.atomic import stage_path
    from deepseek_moe.io.load import CONFIG_FILE, INDEX_FILE, TOKENIZER_FILE
    from deepseek_moe.io.safetensors_file import SafetensorsWriter
    from deepseek_moe.io.save import checkpoint_plan, save_pretrained

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return save_pretrained(model, path)  # one process holds it all
    if getattr(model, "quantization_config", None):
        raise ValueError("save_pretrained_sharded writes unquantised models; quantise the saved checkpoint after")
    rank, world = dist.get_rank(), dist.get_world_size()
    shards = local_shards(model)
    shapes = {name: shard.shape for name, shard in shards.items()}
    plan = checkpoint_plan(model, shapes=shapes)
    mine = {name: (shard.offset, tuple(shard.local.shape)) for name, shard in shards.items()}
    boxes: list[Any] = [None] * world
    dist.all_gather_object(boxes, mine)
    jobs = _plan_jobs(plan.entries, boxes, shapes)

    writers = sorted({job.writer for job in jobs})
    names = {w: f"model-{i + 1:05d}-of-{len(writers):05d}.safetensors" for i, w in enumerate(writers)}
    final = Path(path)
    token = [f"{os.getpid()}-{time.time_ns()}" if rank == 0 else ""]
    dist.broadcast_object_list(token, src=0)
    if final.is_symlink():
        final = final.resolve()
    tmp = stage_path(final, token[0])
    if rank == 0:
        tmp.mkdir(parents=True)
    dist.barrier()

    writer = None
    if rank in names:
        layout = [(j.entry.key, j.entry.dtype, j.entry.shape) for j in jobs if j.writer == rank]
        writer = SafetensorsWriter(tmp / names[rank], layout, plan.metadata)
    try:
        with torch.no_grad():
            for job in jobs:  # the same order on every rank: the sends and receives pair up
                data = _entry_data(job, shards, rank)
                if data is not None:
                    assert writer is not None
                    writer.write(job.entry.key, data)
    finally:
        if writer is not None:
            writer.close()
    dist.barrier()

    if rank == 0:
        _finish_dir(final, tmp, plan.config, {j.entry.key: names[j.writer] for j in jobs},
                    sum(j.entry.nbytes for j in jobs), getattr(model, "tokenizer", None),
                    config_file=CONFIG_FILE, index_file=INDEX_FILE, tokenizer_file=TOKENIZER_FILE)
    dist.barrier()
    return plan.format


def _finish_dir(final: Path, tmp: Path, config: dict[str, Any], weight_map: dict[str, str], total: int,
                tokenizer: Any, *, config_file: str, index_file: str, tokenizer_file: str) -> None:
    """Rank 0: the index, tokenizer and config.json beside the shards, then the directory swapped into place."""
    import json

    from deepseek_moe.io.atomic import replace_directory
    from deepseek_moe.io.save import replaced_by_a_save

    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / index_file).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(str(tmp / tokenizer_file))
    (tmp / config_file).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    replace_directory(tmp, final, replaces=replaced_by_a_save)  # in one step: old or new, never a mix


__all__ = ["load_pretrained_sharded", "local_shards", "save_pretrained_sharded"]
