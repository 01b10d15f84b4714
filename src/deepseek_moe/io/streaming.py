"""Streaming a checkpoint into a model built on the meta device, one tensor at a time.

The model is built on ``meta`` (no storage, no initialisation), then each checkpoint tensor is read straight into
the storage of the tensor that keeps it, created on the target device and in the target dtype the moment it is
first written. Peak memory is the loaded model plus one conversion buffer: nothing is initialised and thrown
away, no second copy of the weights is held, no page of the file stays mapped (see ``safetensors_file``).

Three hooks, all optional (:class:`LoadHooks`), let other code shape the load without a second loader:

* ``prepare(model)`` sees the meta model before anything is read (quantisation swaps modules there);
* ``select(name, expert)`` says which tensors (and which rows of a stacked expert tensor) to load at all: the
  rest is never read and stays on ``meta``, and a layer keeping a contiguous range of experts gets a
  ``RoutedExperts`` of that range (its ``offset`` is the first), as expert parallelism holds them;
* ``transform(name, expert, source)`` may turn one checkpoint tensor into other tensors of the model
  (quantised weights and their scales), reading ``source`` whole or by rows.

Names are ours (``layers.0.attn.wq.weight``, ``layers.1.ffn.experts.w1`` with ``expert`` its row), whatever the
file's layout: the layouts (io/hf.py, io/native.py) only say which of our tensors a checkpoint key fills.

A process that holds only part of a tensor (a sharded parameter: FSDP, expert parallelism) describes it as a
:class:`Shard`, the box of the global tensor its local tensor holds; the loader then reads just that box from the
files (``TensorSource.read_box_into``), and skips the checkpoint tensors that fall outside it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from deepseek_moe.io.fp8 import dequantize_rows
from deepseek_moe.io.safetensors_file import SafetensorsFile
from deepseek_moe.moe.router import Router

if TYPE_CHECKING:
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM


class CheckpointError(ValueError):
    """A checkpoint that does not match the model its config describes."""


@dataclass(frozen=True)
class Block:
    """Where one of our tensors (or one expert row of it) lies in a checkpoint: ``shape`` elements of ``key``
    from flat element ``start``; ``scale_key``: the FP8 block scale (``weight_scale_inv``) when quantised."""

    name: str
    expert: int | None
    file: SafetensorsFile
    key: str
    start: int
    shape: tuple[int, ...]
    scale_key: str | None = None
    scale_file: SafetensorsFile | None = None

    @property
    def where(self) -> str:
        return f"{self.file.path}: {self.key!r}"


@dataclass(frozen=True)
class Shard:
    """The part of one of the model's tensors this process holds: ``local`` is the box of the global tensor (of
    ``shape``) that starts at ``offset`` (one index per dimension) and has ``local``'s shape. A rank with nothing
    of the tensor has an empty ``local``."""

    local: torch.Tensor
    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @staticmethod
    def whole(tensor: torch.Tensor) -> Shard:
        return Shard(tensor, (0,) * tensor.dim(), tuple(tensor.shape))

    def holds_row(self, row: int) -> bool:
        """Whether row ``row`` (global, along dim 0) is in the box, with at least one element of it."""
        return self.local.numel() > 0 and self.offset[0] <= row < self.offset[0] + self.local.shape[0]

    @property
    def is_whole(self) -> bool:
        return tuple(self.local.shape) == self.shape


class TensorSource:
    """One checkpoint tensor as the transform hook sees it: read it whole or by rows, in any dtype.

    ``dtype`` is the dtype as stored (``float8_e4m3fn`` for an FP8 weight; its values are dequantised with its
    block scale on every read, so ``read`` never returns raw FP8 codes).
    """

    def __init__(self, block: Block, fp8_block: tuple[int, int] | None = None) -> None:
        self.block = block
        self.key = block.key
        self.shape = block.shape
        self.dtype = block.file.info(block.key).dtype
        self._fp8_block = fp8_block
        self._scale: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.block.scale_key is not None

    def _row_size(self) -> int:
        size = 1
        for d in self.shape[1:]:
            size *= d
        return size

    def read_rows_into(self, out: torch.Tensor, start: int = 0) -> None:
        """Fill ``out`` (rows ``start .. start + len(out)`` of this tensor, any dtype/device, contiguous)."""
        b = self.block
        first = b.start + start * self._row_size()
        if b.scale_key is None:
            b.file.read_into(b.key, out, start=first)
            return
        assert b.scale_file is not None and self._fp8_block is not None
        if self._scale is None:
            self._scale = b.scale_file.read(b.scale_key, dtype=torch.float32)
        dequantize_rows(b.file, b.key, self._scale, self._fp8_block, out, start)

    def read_box_into(self, out: torch.Tensor, offset: tuple[int, ...]) -> None:
        """Fill ``out`` with the box of this tensor that starts at ``offset`` (one index per dimension) and has
        ``out``'s shape: a shard of it. Rows whole in every other dimension are one read; otherwise each row's
        part is read, recursively. FP8 weights are dequantised by row bands and the columns then kept (block
        scales span columns, so the band is read whole: at most one band of ``bo`` rows more than asked)."""
        if out.numel() == 0:
            return
        if not out.is_contiguous():
            tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
            self.read_box_into(tmp, offset)
            out.copy_(tmp)
            return
        if len(offset) <= 1 or all(o == 0 and n == d for o, n, d in zip(offset[1:], out.shape[1:], self.shape[1:],
                                                                         strict=True)):
            self.read_rows_into(out, offset[0] if offset else 0)
            return
        if self.quantized:
            assert self._fp8_block is not None
            band = self._fp8_block[0]
            cols = tuple(slice(o, o + n) for o, n in zip(offset[1:], out.shape[1:], strict=True))
            for lo in range(offset[0], offset[0] + out.shape[0], band):
                hi = min(lo + band, offset[0] + out.shape[0])
                out[lo - offset[0]:hi - offset[0]].copy_(self.read_rows(lo, hi, dtype=out.dtype)[(slice(None), *cols)])
            return
        b = self.block
        _read_box(b.file, b.key, b.start, self.shape, offset, out)

    def read(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor, in ``dtype`` (default: as stored; bfloat16 for FP8)."""
        return self.read_rows(0, self.shape[0] if self.shape else 1, dtype)

    def read_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:stop`` along the first dimension, in ``dtype`` (default as ``read``)."""
        if dtype is None:
            dtype = torch.bfloat16 if self.quantized else self.dtype
        shape = (stop - start, *self.shape[1:]) if self.shape else ()
        out = torch.empty(shape, dtype=dtype)
        self.read_rows_into(out, start)
        return out


def _read_box(file: SafetensorsFile, key: str, start: int, shape: tuple[int, ...], offset: tuple[int, ...],
              out: torch.Tensor) -> None:
    """Box ``offset`` + ``out.shape`` of the row-major ``shape`` stored from flat element ``start`` of ``key``."""
    row = math.prod(shape[1:])
    if all(o == 0 and n == d for o, n, d in zip(offset[1:], out.shape[1:], shape[1:], strict=True)):
        file.read_into(key, out, start=start + offset[0] * row)  # whole rows: contiguous in the file
        return
    for i in range(out.shape[0]):
        _read_box(file, key, start + (offset[0] + i) * row, shape[1:], offset[1:], out[i])


Select = Callable[[str, "int | None"], bool]
Transform = Callable[[str, "int | None", TensorSource], "Mapping[str, torch.Tensor] | None"]
StoredShape = Callable[[str, "int | None", torch.dtype], "tuple[int, ...] | None"]


@dataclass(frozen=True)
class LoadHooks:
    """Optional callbacks of the streaming loader (see the module docstring). ``stored_shape(name, expert,
    dtype)``: the shape a checkpoint tensor stored in ``dtype`` must have where the prepared model does not say
    (a quantised format's codes and scales); None: the model's own."""

    prepare: Callable[[nn.Module], None] | None = None
    select: Select | None = None
    transform: Transform | None = None
    stored_shape: StoredShape | None = None


# ----------------------------------------------------------------------------------------------------------


@contextmanager
def skip_init() -> Iterator[None]:
    """Modules built inside skip ``torch.nn.init``: on the meta device it computes nothing, yet its first call
    imports torch's meta decompositions, ~70 MB of resident memory that a load never needs."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), leaf


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer by name (a tied parameter under each of its names)."""
    return dict(model.state_dict(keep_vars=True))


def is_stacked(name: str) -> bool:
    """Whether our tensor ``name`` is stacked over routed experts (E, ...): ``experts.w1`` and its companions
    (``experts.w1_scale``); the loader's ``expert`` is then a row of it."""
    leaf = name.rpartition(".")[2]
    return ".experts." in name and leaf.split("_")[0] in ("w1", "w2", "w3")


def required_tensors(model: nn.Module, *, stored_apart: frozenset[str] = frozenset(),
                     shards: Mapping[str, Shard] | None = None) -> set[tuple[str, int | None]]:
    """(name, expert row or None) of every parameter and persistent buffer a checkpoint must fill; a stacked
    tensor's rows by their global index (a RoutedExperts holding a range of experts starts at its ``offset``;
    a sharded tensor's rows are those of its global shape). ``stored_apart``: names no checkpoint holds (a tied
    head)."""
    shards = shards or {}
    required: set[tuple[str, int | None]] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in stored_apart:
            continue
        if not is_stacked(name):
            required.add((name, None))
        elif name in shards:
            required.update((name, e) for e in range(shards[name].shape[0]))
        else:
            first = getattr(model.get_submodule(name.rpartition(".")[0]), "offset", 0)
            required.update((name, e) for e in range(first, first + tensor.shape[0]))
    return required


class Materializer:
    """Creates each meta tensor of the model on the target device the first time it is written.

    dtype: floating parameters take the load dtype, except the router's, which stays float32 (issue 9: the
    router is never quantised nor rounded); buffers and non-float tensors keep the dtype the meta model declares
    (V3's correction bias float32, quantised codes int8). ``dtype`` None: every tensor keeps the declared one.
    A tensor already materialised (a model the caller laid out and allocated) is written where it is."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None, device: torch.device) -> None:
        self.model, self.dtype, self.device = model, dtype, device

    def target(self, name: str) -> torch.Tensor:
        module, leaf = _owner(self.model, name)
        tensor = getattr(module, leaf, None)
        if not isinstance(tensor, torch.Tensor):
            raise KeyError(name)
        if tensor.device.type != "meta":
            return tensor
        is_param = isinstance(tensor, nn.Parameter)
        dtype = tensor.dtype
        if self.dtype is not None and is_param and tensor.dtype.is_floating_point:
            dtype = torch.float32 if isinstance(module, Router) else self.dtype
            # (routing runs in fp32: centroids rounded to bf16 flip top-K choices)
        new = torch.empty(tensor.shape, dtype=dtype, device=self.device)
        if is_param:
            module._parameters[leaf] = nn.Parameter(new, requires_grad=tensor.requires_grad and dtype.is_floating_point)
            return module._parameters[leaf]  # type: ignore[return-value]
        module._buffers[leaf] = new
        return new


def restrict_experts(model: nn.Module, rows: Mapping[str, Iterable[int]]) -> dict[str, tuple[int, int]]:
    """Rebuild (on meta) each layer's RoutedExperts to hold only the selected experts; returns, per module whose
    experts were restricted, (first kept expert, experts in the checkpoint)."""
    from deepseek_moe.moe.experts import RoutedExperts

    ranges: dict[str, tuple[int, int]] = {}
    by_module: dict[str, set[int]] = defaultdict(set)
    for name, selected in rows.items():
        by_module[name.rpartition(".")[0]].update(selected)
    for module_name, experts in by_module.items():
        module = model.get_submodule(module_name)
        if not isinstance(module, RoutedExperts):
            continue
        kept = sorted(experts)
        if len(kept) == module.n_experts and module.offset == 0:
            continue
        if kept != list(range(kept[0], kept[0] + len(kept))):
            raise ValueError(f"select keeps experts {kept} of {module_name}: a layer's selected experts must "
                             "be one contiguous range (RoutedExperts holds [offset, offset + n))")
        _, inter_dim, dim = module.w1.shape
        with torch.device("meta"), skip_init():
            new = RoutedExperts(len(kept), dim, inter_dim, init_std=module.init_std, offset=kept[0])
        new.use_grouped_mm, new.use_mkl_batch = module.use_grouped_mm, module.use_mkl_batch
        parent, leaf = _owner(model, module_name)
        setattr(parent, leaf, new)
        ranges[module_name] = (kept[0], module.n_experts)
    return ranges


class Destinations:
    """Where each of our tensors is written: the :class:`Shard` this process holds of it (given for a sharded
    model; a contiguous expert range kept by ``select``; else the whole tensor, materialised on first write)."""

    def __init__(self, mat: Materializer, shards: Mapping[str, Shard],
                 expert_ranges: Mapping[str, tuple[int, int]]) -> None:
        self.mat, self.shards, self.expert_ranges = mat, shards, expert_ranges

    def wants(self, name: str, expert: int | None) -> bool:
        """False for a tensor (or expert row) that lies outside what this process holds: it is never read."""
        return _wanted(self.shards, name, expert)

    def _range(self, name: str) -> tuple[int, int] | None:
        return self.expert_ranges.get(name.rpartition(".")[0]) if is_stacked(name) else None

    def global_shape(self, name: str) -> tuple[int, ...]:
        """The shape of the whole tensor ``name`` (every expert), allocating nothing. KeyError: no such tensor."""
        if name in self.shards:
            return self.shards[name].shape
        module, leaf = _owner(self.mat.model, name)
        tensor = getattr(module, leaf, None)
        if not isinstance(tensor, torch.Tensor):
            raise KeyError(name)
        kept = self._range(name)
        return (kept[1], *tensor.shape[1:]) if kept else tuple(tensor.shape)

    def shard(self, name: str) -> Shard:
        if name in self.shards:
            return self.shards[name]
        tensor = self.mat.target(name)
        kept = self._range(name)
        if kept:
            first, total = kept
            return Shard(tensor, (first, *([0] * (tensor.dim() - 1))), (total, *tensor.shape[1:]))
        return Shard.whole(tensor)


def _wanted(shards: Mapping[str, Shard], name: str, expert: int | None) -> bool:
    shard = shards.get(name)
    if shard is None:
        return True
    return shard.holds_row(expert) if expert is not None else shard.local.numel() > 0


ExplainShape = Callable[[str, "tuple[int, ...]", "tuple[int, ...]"], str]


def _check_shape(block: Block, name: str, expert: int | None, stored: tuple[int, ...],
                 shape: tuple[int, ...], explain: ExplainShape | None) -> None:
    """``stored`` (of ``block``) against the whole model tensor's ``shape``: refused naming the config field."""
    if expert is not None:
        if not 0 <= expert < shape[0]:
            raise CheckpointError(f"{block.where}: expert {expert} out of range for {shape[0]} routed "
                                  "experts (n_routed_experts in config.json)")
        shape = shape[1:]
    if stored != shape:
        why = explain(name, stored, shape) if explain is not None else ""
        raise CheckpointError(f"{block.where} has shape {stored}, expected {shape} (model {name!r}"
                              f"{'' if expert is None else f' expert {expert}'}){': ' + why if why else ''}")


def check_stored_shapes(blocks: Iterable[Block], shape_of: Callable[[str], tuple[int, ...] | None],
                        explain: ExplainShape | None = None) -> None:
    """Every float block against the model its config builds (``shape_of``: the whole tensor's shape, None for a
    name the model does not have), from the files' headers alone: a config that disagrees with the tensors is
    refused before anything is allocated, or enumerated per expert. Integer tensors (a quantised format's codes)
    are the prepare/transform hooks' to shape, and are checked after ``prepare``."""
    for b in blocks:
        if not b.file.info(b.key).dtype.is_floating_point:
            continue
        shape = shape_of(b.name)
        if shape is not None:
            _check_shape(b, b.name, b.expert, b.shape, shape, explain)


def stream_into(model: DeepSeekMoEForCausalLM, blocks: Iterable[Block], *, dtype: torch.dtype | None,
                device: torch.device, hooks: LoadHooks, fp8_block: tuple[int, int] | None,
                describe_missing: Callable[[str, int | None], str], explain_shape: ExplainShape | None = None,
                stored_apart: frozenset[str] = frozenset(), shards: Mapping[str, Shard] | None = None) -> None:
    """Read every selected block into ``model`` (built on meta); then check nothing required is missing and give
    the runtime buffers no checkpoint holds their zero state.

    Order: every block's shape is checked against the model first (nothing is allocated before); ``select``
    then restricts the routed experts, ``prepare`` sees the restricted model (so a quantised twin holds exactly
    the selected experts), the blocks its tensors take are checked again, and only then is anything read.
    ``shards``: for a model laid out over processes, the part of each tensor this process holds (its local
    tensor already allocated); only the blocks that overlap it are read, and only their overlap.
    ``stored_apart``: names no checkpoint holds (a tied head)."""
    select = hooks.select or (lambda name, expert: True)
    shards = shards or {}
    blocks = list(blocks)
    declared = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    check_stored_shapes(blocks, lambda n: shards[n].shape if n in shards else declared.get(n), explain_shape)

    _check_last_experts(model, blocks, declared, shards, select, describe_missing)

    expert_rows: dict[str, list[int]] = defaultdict(list)
    for name, e in required_tensors(model, stored_apart=stored_apart, shards=shards):
        if e is not None and select(name, e) and name not in shards:  # a sharded tensor's layout is the caller's
            expert_rows[name].append(e)
    dest = Destinations(Materializer(model, dtype, device), shards, restrict_experts(model, expert_rows))
    if hooks.prepare is not None:
        hooks.prepare(model)
    chosen = [b for b in blocks if select(b.name, b.expert) and dest.wants(b.name, b.expert)]
    _check_prepared(chosen, dest, hooks, explain_shape)
    # A tensor ``prepare`` added (a quantised weight's scales) is required wherever its module's row is read.
    read_rows = {(b.name.rpartition(".")[0], b.expert) for b in chosen}
    required = {(n, e) for n, e in required_tensors(model, stored_apart=stored_apart, shards=shards)
                if ((select(n, e) and dest.wants(n, e)) if n in declared
                    else (n.rpartition(".")[0], e) in read_rows)}

    loaded: set[tuple[str, int | None]] = set()
    by_file: dict[Path, list[Block]] = defaultdict(list)
    for b in chosen:
        by_file[b.file.path].append(b)
    with torch.no_grad():
        for file_blocks in by_file.values():
            # In file order: the reads then sweep each file once, front to back.
            for b in sorted(file_blocks, key=lambda b: (b.file.info(b.key).offset, b.start)):
                source = TensorSource(b, fp8_block)
                out = hooks.transform(b.name, b.expert, source) if hooks.transform else None
                if out is None:
                    _write(dest, b.name, b.expert, b, source, None, explain_shape)
                else:
                    for name, tensor in out.items():
                        expert = b.expert if is_stacked(name) else None
                        _write(dest, name, expert, b, None, tensor, explain_shape)
                        loaded.add((name, expert))
                loaded.add((b.name, b.expert))
    missing = required - loaded
    if missing:
        names = sorted(describe_missing(n, e) for n, e in missing)
        shown = ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        files = sorted({str(b.file.path) for b in chosen}) or ["no files"]
        raise CheckpointError(f"checkpoint ({', '.join(files)}) is missing tensor(s) {shown}")
    finish_runtime_state(model, device)


def _check_last_experts(model: nn.Module, blocks: list[Block], declared: Mapping[str, tuple[int, ...]],
                        shards: Mapping[str, Shard], select: Select,
                        describe_missing: Callable[[str, int | None], str]) -> None:
    """Each stacked tensor's last expert must be in the files before the experts are enumerated one by one: a
    config naming 10^8 experts (and a checkpoint without the router that would have shown it) is refused here,
    not after building sets of 10^8 names."""
    held = {(b.name, b.expert) for b in blocks if b.expert is not None}
    for name, shape in declared.items():
        if not is_stacked(name) or name in shards or not shape or shape[0] == 0:
            continue
        first = getattr(model.get_submodule(name.rpartition(".")[0]), "offset", 0)
        last = first + shape[0] - 1
        if (name, last) not in held and select(name, last):
            raise CheckpointError(f"checkpoint is missing tensor(s) {describe_missing(name, last)!r}: the config "
                                  f"gives {name} {shape[0]} routed experts (n_routed_experts in config.json)")


def _check_prepared(chosen: list[Block], dest: Destinations, hooks: LoadHooks,
                    explain: ExplainShape | None) -> None:
    """The blocks to read against the prepared model (or the shapes ``hooks.stored_shape`` gives), before any
    storage is allocated; a block filling no tensor of the model is refused unless a transform takes it."""
    for b in chosen:
        dtype = b.file.info(b.key).dtype
        stored = hooks.stored_shape(b.name, b.expert, dtype) if hooks.stored_shape is not None else None
        try:
            shape: tuple[int, ...] | None = dest.global_shape(b.name)
        except (KeyError, AttributeError):
            shape = None
        if stored is not None:
            if b.expert is not None and shape is not None:
                _check_shape(b, b.name, b.expert, (), (shape[0],), None)  # the expert's index
            if b.shape != stored:
                why = explain(b.name, b.shape, stored) if explain is not None else ""
                raise CheckpointError(f"{b.where} has shape {b.shape}, expected {stored} (model {b.name!r})"
                                      f"{': ' + why if why else ''}")
        elif shape is not None:
            _check_shape(b, b.name, b.expert, b.shape, shape, explain)
        elif hooks.transform is None:
            raise CheckpointError(f"{b.where}: fills {b.name!r}, which this model does not have (is the config "
                                  "right?)")


def _write(dest: Destinations, name: str, expert: int | None, block: Block, source: TensorSource | None,
           tensor: torch.Tensor | None, explain: ExplainShape | None) -> None:
    try:
        shape = dest.global_shape(name)
    except (KeyError, AttributeError):
        raise CheckpointError(f"{block.where}: fills {name!r}, which this model does not have (is the config "
                              "right?)") from None
    # Checked before the destination is allocated: a transform's output too.
    _check_shape(block, name, expert, tuple(tensor.shape) if tensor is not None else block.shape, shape, explain)
    shard = dest.shard(name)
    local, offset = shard.local, shard.offset
    if expert is not None:
        if not shard.holds_row(expert):
            return  # another process's expert (a transform's output beside one of ours)
        local, offset = local[expert - offset[0]], offset[1:]
    if tensor is not None:
        # A transform returns the whole tensor; a shard keeps its box of it (sliced after the transform).
        local.copy_(tensor[tuple(slice(o, o + n) for o, n in zip(offset, local.shape, strict=True))])
    else:
        assert source is not None
        source.read_box_into(local, offset)


def finish_runtime_state(model: nn.Module, device: torch.device) -> None:
    """Zero the runtime buffers no checkpoint holds (MoE bias counts: a loaded model has counted nothing yet)
    and give the per-forward attributes built on meta a value."""
    for module in model.modules():
        for leaf, buf in list(module._buffers.items()):
            if buf is not None and leaf in module._non_persistent_buffers_set:
                if buf.device.type == "meta":
                    module._buffers[leaf] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
                else:
                    buf.zero_()
        aux = getattr(module, "aux_loss", None)
        if isinstance(aux, torch.Tensor) and aux.device.type == "meta":
            module.aux_loss = torch.zeros((), device=device)  # set per forward; built on meta with the model


__all__ = ["Block", "CheckpointError", "Destinations", "LoadHooks", "Materializer", "Shard", "TensorSource",
           "check_stored_shapes", "finish_runtime_state", "is_stacked", "model_tensors", "required_tensors",
           "restrict_experts", "skip_init", "stream_into"]
