"""``to_onnx``: export any module containing MoE layers, with every expert in the graph.

Uses ``torch.onnx.export`` (the torch.export-based exporter) on the module with its MoE layers swapped for
:class:`~deepseek_moe.export.moe.DenseMoE`. The file is written next to its destination and moved into place
only once complete, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepseek_moe._torch_compat import clear_dispatch_cache
from deepseek_moe.export.errors import ExportError
from deepseek_moe.export.flat import flatten, unflatten
from deepseek_moe.export.moe import dense_moe_layers
from deepseek_moe.kernels.switch import reference_paths

DEFAULT_OPSET = 18
# Above this many parameter bytes the weights go to an external data file (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1 << 30


def default_dynamic_shapes(example_inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Dimension 0 of every tensor dynamic ("batch"), and dimension 1 ("seq") when it has 3+ dimensions."""

    def dims(t: torch.Tensor) -> dict[int, Any] | None:
        if t.dim() == 0:
            return None
        spec = {0: torch.export.Dim.DYNAMIC}
        if t.dim() >= 3:
            spec[1] = torch.export.Dim.DYNAMIC
        return spec

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return dims(x)
        if isinstance(x, Mapping):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(walk(v) for v in x)
        return None

    return tuple(walk(x) for x in example_inputs)


def flat_input_names(module: nn.Module, example_inputs: Sequence[Any]) -> list[str]:
    """The forward's parameter names for tensor inputs; the keys of dict inputs (``name.key`` when nested)."""
    params = [p.name for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(example_inputs) > len(params):
        raise ExportError(f"{len(example_inputs)} example inputs but {type(module).__name__}.forward takes "
                          f"{len(params)} positional arguments ({', '.join(params)})")
    names: list[str] = []

    def walk(prefix: str, x: Any, top: bool) -> None:
        if isinstance(x, torch.Tensor):
            names.append(prefix)
        elif isinstance(x, Mapping):
            for k, v in x.items():
                walk(str(k) if top else f"{prefix}.{k}", v, False)
        elif isinstance(x, list | tuple):
            for i, v in enumerate(x):
                walk(f"{prefix}.{i}", v, False)

    for name, x in zip(params, example_inputs, strict=False):
        walk(name, x, isinstance(x, Mapping))
    return names


def check_writable(path: Path) -> None:
    """Fail before any work when ``path`` cannot be created (missing or read-only directory, a directory)."""
    parent = path.parent
    if path.is_dir():
        raise ExportError(f"{path} is a directory; give a file name such as {path / 'model.onnx'}")
    if parent.exists() and not parent.is_dir():
        raise ExportError(f"cannot write {path}: {parent} is not a directory")
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {path}: directory {parent} is not writable")


@contextmanager
def staged_directory(final_dir: Path) -> Iterator[Path]:
    """A hidden directory inside ``final_dir`` whose files are moved into ``final_dir`` when the block succeeds.

    On failure the stage is deleted, and so is ``final_dir`` itself if this call created it: nothing partial
    is left behind. Moves within one directory are atomic renames.
    """
    created = next((p for p in [final_dir, *final_dir.parents] if p.exists()), None)
    top_new = None if created == final_dir else ([p for p in [final_dir, *final_dir.parents] if not p.exists()][-1])
    try:
        final_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".export-", suffix=".partial", dir=final_dir))
    except OSError as e:
        raise ExportError(f"cannot write to {final_dir}: {e.strerror or e}") from e
    ok = False
    try:
        yield stage
        for item in sorted(stage.iterdir()):
            os.replace(item, final_dir / item.name)
        ok = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not ok and top_new is not None:
            shutil.rmtree(top_new, ignore_errors=True)


class _FlatInputs(nn.Module):
    """Takes the inputs' tensors flat and rebuilds the original structure (dicts, nested tuples) for ``inner``:
    torch.onnx.export would read a trailing dict in ``args`` as keyword arguments."""

    def __init__(self, inner: nn.Module, spec: Any) -> None:
        super().__init__()
        self.inner, self.spec = inner, spec

    def forward(self, *flat: torch.Tensor) -> Any:
        return self.inner(*unflatten(list(flat), self.spec))


def _clear_rnn_dispatch_caches() -> None:
    # torch.onnx swaps in while-loop RNN decompositions for dynamic shapes and restores them afterwards, but the
    # op's dispatch cache keeps the first resolution: a second LSTM export in one process then specialises the
    # sequence length and fails. Clearing the cache makes every export start as the first one did.
    for op in (torch.ops.aten.lstm.input, torch.ops.aten.gru.input, torch.ops.aten.rnn_tanh.input,
               torch.ops.aten.rnn_relu.input):
        clear_dispatch_cache(op)


def name_dims(path: Path, dim_names: Mapping[str, Sequence[str | None]]) -> None:
    """Rename the exporter's symbolic dims (s0, s17, ...) after ``dim_names`` (input name -> per-dim names).

    The same symbol gets the same name everywhere (inputs, outputs, expressions such as ``s3 + 1``); a name
    already taken by another symbol gets the input's name appended. Rewrites the graph file only.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    rename: dict[str, str] = {}
    for value in model.graph.input:
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            wanted = dim_names.get(value.name, ())
            if i >= len(wanted) or wanted[i] is None or not dim.dim_param or dim.dim_param in rename:
                continue
            name = wanted[i]
            assert name is not None
            rename[dim.dim_param] = name if name not in rename.values() else f"{name}_{value.name}"
    if not rename:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b")
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: rename[m.group(1)], dim.dim_param)
    onnx.save(model, str(path))


def free_output_dims(path: Path) -> None:
    """Output dims the exporter fixed to an example's size (a batch of 1 traced with a dynamic batch) but that
    the graph computes from its inputs are made symbolic: ONNX Runtime otherwise warns "Expected shape {1,3}
    ... actual {8,3}" on every call. ONNX shape inference, run on the graph with the outputs' shapes cleared,
    says which dims are constant; the others take its symbol (or ``<output>_dim<i>``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    fixed = [o for o in model.graph.output if any(d.HasField("dim_value") for d in o.type.tensor_type.shape.dim)]
    if not fixed:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for o in probe.graph.output:
        o.type.tensor_type.ClearField("shape")
    del probe.graph.value_info[:]
    try:
        inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(probe, data_prop=True).graph.output}
    except Exception:  # inference can fail on exotic ops; then every fixed dim is freed
        inferred = {}
    changed = False
    for out in fixed:
        dims = inferred[out.name].type.tensor_type.shape.dim if out.name in inferred else []
        for i, dim in enumerate(out.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                continue
            known = dims[i] if i < len(dims) else None
            if known is not None and known.HasField("dim_value") and known.dim_value == dim.dim_value:
                continue  # a true constant (a classifier's 3 classes)
            symbol = known.dim_param if known is not None and known.HasField("dim_param") else ""
            dim.dim_param = symbol if symbol and not symbol.startswith("unk__") else f"{out.name}_dim{i}"
            changed = True
    if changed:
        onnx.save(model, str(path))


def fold_weight_constants(model: Any) -> None:
    """Fold computations on weights into initializers, however large (the exporter's own pass stops at 256K
    elements). Without this an LSTM's gates are re-ordered from PyTorch's layout to ONNX's by Slice/Concat on
    every call, and the quantiser, which only sees initializers, leaves those weights in float32."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize(model, input_size_limit=1 << 31, output_size_limit=1 << 31)


def export_graph(module: nn.Module, path: Path, example_inputs: tuple[Any, ...], *, input_names: list[str],
                 output_names: list[str] | None, dynamic_shapes: Any, opset_version: int,
                 external_data: bool) -> None:
    """torch.onnx.export into ``path`` (which the caller stages), quietly, in eval mode and without gradients."""
    was_training = module.training
    module.eval()
    # The exporter logs a warning per torchvision op it cannot register when torchvision is absent.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        _clear_rnn_dispatch_caches()
        # reference_paths: the inference kernels read data pointers, which the exporter's fake tensors have not
        with torch.no_grad(), reference_paths(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not all(isinstance(x, torch.Tensor) for x in example_inputs):
                flat, spec = flatten(example_inputs)
                module, example_inputs = _FlatInputs(module, spec), tuple(flat)
                if dynamic_shapes is not None:
                    # One entry, the tuple bound to *flat.
                    dynamic_shapes = (tuple(flatten(
                        dynamic_shapes, is_leaf=lambda x: x is None or isinstance(x, dict)
                        and all(isinstance(k, int) for k in x))[0]),)
            try:
                program = torch.onnx.export(module, example_inputs, dynamo=True, dynamic_shapes=dynamic_shapes,
                                            input_names=input_names, output_names=output_names,
                                            opset_version=opset_version, optimize=False, verbose=False)
            except Exception as e:  # the exporter's own errors run to pages; keep its summary, chain the rest
                summary = str(e).split("## Exception summary")[-1].strip().splitlines()
                reason = next((line for line in summary if line.strip()), type(e).__name__)
                raise ExportError(f"torch.onnx.export could not capture {type(module).__name__}: {reason}") from e
        if program is None:  # for mypy: dynamo=True always returns the program
            raise ExportError("torch.onnx.export returned no program")
        fold_weight_constants(program.model)
        program.save(str(path), external_data=external_data)
        free_output_dims(path)
    finally:
        registration_log.setLevel(level)
        module.train(was_training)


def to_onnx(module: nn.Module, path: str | os.PathLike[str], example_inputs: tuple[Any, ...], *,
            dynamic_shapes: Any = None, input_names: list[str] | None = None,
            output_names: list[str] | None = None, opset_version: int = DEFAULT_OPSET,
            external_data: bool | None = None) -> Path:
    """Export ``module`` (any nn.Module; its MoE layers get the dense, all-experts form) to ONNX at ``path``.

    ``example_inputs`` is a tuple as ``torch.onnx.export`` takes (tensors, or dicts of tensors). By default dim 0
    of every input is dynamic, and dim 1 too for inputs of 3+ dims; ``dynamic_shapes`` (torch.export's form)
    overrides. Input names are the forward's parameter names (a dict input's keys); outputs are ``output`` or
    ``output_0, output_1, ...`` unless named. Weights go to ``<path>.data`` when ``external_data`` (default:
    only past 1 GiB). Raises :class:`ExportError` for configs it cannot express exactly and unwritable paths;
    nothing is left at ``path`` when the export fails. Returns the path written.
    """
    path = Path(path)
    check_writable(path)
    if not isinstance(example_inputs, tuple):
        raise ExportError(f"example_inputs must be a tuple (of tensors), got {type(example_inputs).__name__}")
    names = input_names if input_names is not None else flat_input_names(module, example_inputs)
    shapes = dynamic_shapes if dynamic_shapes is not None else default_dynamic_shapes(example_inputs)
    if external_data is None:
        n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        external_data = n_bytes > EXTERNAL_DATA_BYTES
    modes = {m: m.training for m in module.modules()}  # the caller's train/eval state, restored after
    try:
        _export(module, path, example_inputs, names, shapes, dynamic_shapes is None, output_names, opset_version,
                external_data)
    finally:
        for m, training in modes.items():
            m.training = training
    return path


def _export(module: nn.Module, path: Path, example_inputs: tuple[Any, ...], names: list[str], shapes: Any,
            default_shapes: bool, output_names: list[str] | None, opset_version: int, external_data: bool) -> None:
    with dense_moe_layers(module) as exportable:
        if output_names is None:
            with torch.no_grad():
                out = exportable.eval()(*example_inputs)
            n_out = len(out) if isinstance(out, tuple | list) else 1
            output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
        with staged_directory(path.parent) as stage:
            export_graph(exportable, stage / path.name, example_inputs, input_names=names,
                         output_names=output_names, dynamic_shapes=shapes, opset_version=opset_version,
                         external_data=external_data)
            if default_shapes:
                flat = _flat_tensors(example_inputs)
                name_dims(stage / path.name, {n: ["batch", "seq" if t.dim() >= 3 else None]
                                              for n, t in zip(names, flat, strict=False)})


def _flat_tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _flat_tensors(v)]
    if isinstance(x, list | tuple):
        return [t for v in x for t in _flat_tensors(v)]
    return []
