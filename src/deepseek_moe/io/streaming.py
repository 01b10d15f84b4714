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
"""

from __future__ import annotations

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


Select = Callable[[str, "int | None"], bool]
Transform = Callable[[str, "int | None", TensorSource], "Mapping[str, torch.Tensor] | None"]


@dataclass(frozen=True)
class LoadHooks:
    """Optional callbacks of the streaming loader (see the module docstring)."""

    prepare: Callable[[nn.Module], None] | None = None
    select: Select | None = None
    transform: Transform | None = None


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


def _is_stacked(name: str) -> bool:
    leaf = name.rpartition(".")[2]
    return ".experts." in name and leaf.split("_")[0] in ("w1", "w2", "w3")


class Materializer:
    """Creates each meta tensor of the model on the target device the first time it is written.

    dtype: floating parameters take the load dtype, except the router's, which stays float32 (issue 9: the
    router is never quantised nor rounded); buffers and non-float tensors keep the dtype the meta model declares
    (V3's correction bias float32, quantised codes int8)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        self.model, self.dtype, self.device = model, dtype, device
        self.params = {name for name, _ in model.named_parameters(remove_duplicate=False)}

    def target(self, name: str) -> torch.Tensor:
        module, leaf = _owner(self.model, name)
        tensor = getattr(module, leaf, None)
        if not isinstance(tensor, torch.Tensor):
            raise KeyError(name)
        if tensor.device.type != "meta":
            return tensor
        is_param = isinstance(tensor, nn.Parameter)
        dtype = self.dtype if is_param and tensor.dtype.is_floating_point else tensor.dtype
        if is_param and dtype.is_floating_point and isinstance(module, Router):
            dtype = torch.float32  # routing runs in fp32: centroids rounded to bf16 flip top-K choices
        new = torch.empty(tensor.shape, dtype=dtype, device=self.device)
        if is_param:
            module._parameters[leaf] = nn.Parameter(new, requires_grad=tensor.requires_grad and dtype.is_floating_point)
            return module._parameters[leaf]  # type: ignore[return-value]
        module._buffers[leaf] = new
        return new


def restrict_experts(model: nn.Module, rows: Mapping[str, list[int]]) -> dict[str, dict[int, int]]:
    """Rebuild (on meta) each layer's RoutedExperts to hold only the selected experts; returns, per stacked
    tensor name, global expert -> local row."""
    from deepseek_moe.moe.experts import RoutedExperts

    local: dict[str, dict[int, int]] = {}
    by_module: dict[str, set[int]] = defaultdict(set)
    for name, selected in rows.items():
        by_module[name.rpartition(".")[0]].update(selected)
    for module_name, experts in by_module.items():
        module = model.get_submodule(module_name)
        if not isinstance(module, RoutedExperts):
            continue
        kept = sorted(experts)
        if len(kept) == module.n_experts and module.offset == 0:
            mapping = {e: e for e in kept}
        else:
            if kept != list(range(kept[0], kept[0] + len(kept))):
                raise ValueError(f"select keeps experts {kept} of {module_name}: a layer's selected experts must "
                                 "be one contiguous range (RoutedExperts holds [offset, offset + n))")
            _, inter_dim, dim = module.w1.shape
            with torch.device("meta"), skip_init():
                new = RoutedExperts(len(kept), dim, inter_dim, init_std=module.init_std, offset=kept[0])
            new.use_grouped_mm = module.use_grouped_mm
            parent, leaf = _owner(model, module_name)
            setattr(parent, leaf, new)
            mapping = {e: e - kept[0] for e in kept}
        for leaf in ("w1", "w2", "w3"):
            local[f"{module_name}.{leaf}"] = mapping
    return local


def stream_into(model: DeepSeekMoEForCausalLM, blocks: Iterable[Block], *, dtype: torch.dtype,
                device: torch.device, hooks: LoadHooks, required: set[tuple[str, int | None]],
                fp8_block: tuple[int, int] | None, describe_missing: Callable[[str, int | None], str]) -> None:
    """Read every selected block into ``model`` (built on meta, prepared); then check nothing required is
    missing and give the remaining unfilled runtime buffers their zero state."""
    select = hooks.select or (lambda name, expert: True)
    chosen = [b for b in blocks if select(b.name, b.expert)]
    required = {(n, e) for n, e in required if select(n, e)}

    expert_rows: dict[str, list[int]] = defaultdict(list)
    for name, e in required:
        if e is not None:
            expert_rows[name].append(e)
    local_rows = restrict_experts(model, expert_rows)

    mat = Materializer(model, dtype, device)
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
                    _write(mat, local_rows, b.name, b.expert, b, source, None)
                else:
                    for name, tensor in out.items():
                        expert = b.expert if _is_stacked(name) else None
                        _write(mat, local_rows, name, expert, b, None, tensor)
                        loaded.add((name, expert))
                loaded.add((b.name, b.expert))
    missing = required - loaded
    if missing:
        names = sorted(describe_missing(n, e) for n, e in missing)
        shown = ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        files = sorted({str(b.file.path) for b in chosen}) or ["no files"]
        raise CheckpointError(f"checkpoint ({', '.join(files)}) is missing tensor(s) {shown}")
    _finish(model, device, mat)


def _write(mat: Materializer, local_rows: Mapping[str, Mapping[int, int]], name: str, expert: int | None,
           block: Block, source: TensorSource | None, tensor: torch.Tensor | None) -> None:
    try:
        dest = mat.target(name)
    except (KeyError, AttributeError):
        raise CheckpointError(f"{block.where}: fills {name!r}, which this model does not have (is the config "
                              "right?)") from None
    if expert is not None:
        row = local_rows.get(name, {}).get(expert, expert)
        if not 0 <= row < dest.shape[0]:
            raise CheckpointError(f"{block.where}: expert {expert} out of range for {dest.shape[0]} routed "
                                  "experts (n_routed_experts in config.json)")
        dest = dest[row]
    shape = tuple(tensor.shape) if tensor is not None else block.shape
    if shape != tuple(dest.shape):
        raise CheckpointError(f"{block.where} has shape {shape}, expected {tuple(dest.shape)} (model {name!r})")
    if tensor is not None:
        dest.copy_(tensor)
    else:
        assert source is not None
        source.read_rows_into(dest)


def _finish(model: nn.Module, device: torch.device, mat: Materializer) -> None:
    """Zero the runtime buffers no checkpoint holds (MoE bias counts) and re-tie shared parameters."""
    for module in model.modules():
        for leaf, buf in list(module._buffers.items()):
            if buf is not None and buf.device.type == "meta" and leaf in module._non_persistent_buffers_set:
                module._buffers[leaf] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
        aux = getattr(module, "aux_loss", None)
        if isinstance(aux, torch.Tensor) and aux.device.type == "meta":
            module.aux_loss = torch.zeros((), device=device)  # set per forward; built on meta with the model


__all__ = ["Block", "CheckpointError", "LoadHooks", "Materializer", "TensorSource", "model_tensors",
           "restrict_experts", "skip_init", "stream_into"]
