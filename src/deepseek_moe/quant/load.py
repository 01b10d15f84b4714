"""Quantised loading through the one streaming loader (``deepseek_moe.io``), as its hooks.

``quant_hooks`` gives ``load_pretrained`` a ``prepare`` that swaps the meta model's targets for empty quantised
twins, and a ``transform`` that fills them: a full-precision weight is read in row chunks and each chunk
quantised into the codes (so the full-precision model never exists: the peak is the quantised model plus one
chunk); stored codes are copied (int4 repacked for the kernel); stored scales are checked for the dtype the
format fixes. Nothing here reads files itself.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deepseek_moe.io.atomic import staged_checkpoint
from deepseek_moe.io.load import load_pretrained, read_config
from deepseek_moe.io.save import replaced_by_a_save, save_pretrained
from deepseek_moe.io.streaming import CheckpointError, LoadHooks, TensorSource
from deepseek_moe.quant import pack
from deepseek_moe.quant.apply import prepare_model
from deepseek_moe.quant.config import QUANT_METHOD, QuantConfig, parse_quantize
from deepseek_moe.quant.modules import QuantLinear, QuantRoutedExperts, quantize_rows

if TYPE_CHECKING:
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

ROW_CHUNK_ELEMS = 1 << 24  # 64 MB of fp32 read and quantised at a time


def stored_quant_config(raw: Mapping[str, Any], source: str) -> QuantConfig | None:
    quant = raw.get("quantization_config")
    if not quant or not isinstance(quant, Mapping) or quant.get("quant_method") != QUANT_METHOD:
        return None
    try:
        return QuantConfig.from_hf(quant, source=source)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def resolve_quant_config(raw: Mapping[str, Any], quantize: Any, source: str) -> QuantConfig:
    """The quantisation a load applies: the checkpoint's own (``quantize`` may repeat it: a no-op) or the one
    asked for; other bits than stored are an error (rounding twice compounds the error)."""
    stored = stored_quant_config(raw, source)
    asked = parse_quantize(quantize)
    if stored is not None and asked is not None and (asked.bits, asked.group_size) != (stored.bits,
                                                                                      stored.group_size):
        raise ValueError(f"{source} is already quantised to int{stored.bits} (group {stored.group_size}); "
                         f"re-quantising to int{asked.bits} would compound the rounding error: quantise the "
                         "full-precision checkpoint instead")
    qcfg = stored or asked
    if qcfg is None:
        raise ValueError(f"{source}: not a quantised checkpoint and no quantize= given")
    return qcfg


class _Quantizer:
    """The transform hook: our tensor name (+ expert row) and its source -> what to write."""

    def __init__(self, qcfg: QuantConfig) -> None:
        self.qcfg = qcfg
        self.model: nn.Module | None = None

    def prepare(self, model: nn.Module, dtype: torch.dtype) -> None:
        prepare_model(model, self.qcfg, dtype=dtype)
        self.model = model
        self.owners = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear | QuantRoutedExperts)}

    def stored_shape(self, name: str, expert: int | None, dtype: torch.dtype) -> tuple[int, ...] | None:
        """The shape a checkpoint tensor of a quantised layer must have: a float weight or int8 codes (rows,
        in), int4 codes (rows, in/2); the scale (rows,) for int8, (rows, in/group_size) for int4."""
        owner_name, _, leaf = name.rpartition(".")
        owner = self.owners.get(owner_name)
        if owner is None or leaf == "bias":
            return None
        if isinstance(owner, QuantLinear):
            rows, width, bits = owner.out_features, owner.in_features, owner.bits
        else:
            base = leaf.removesuffix("_scale")
            rows, width = (owner.dim, owner.inter_dim) if base == "w2" else (owner.inter_dim, owner.dim)
            bits = owner.bits_of(base)
        if leaf.endswith("_scale"):
            return (rows,) if bits == 8 else (rows, width // owner.group_size)
        packed = bits == 4 and not dtype.is_floating_point  # codes of the wrong dtype: the transform names it
        return (rows, width // 2) if packed else (rows, width)

    def __call__(self, name: str, expert: int | None, src: TensorSource) -> Mapping[str, torch.Tensor] | None:
        owner_name, _, leaf = name.rpartition(".")
        owner = self.owners.get(owner_name)
        if owner is None:
            return None  # not quantised: the loader's default read
        if leaf.endswith("_scale"):
            want = getattr(owner, leaf).dtype
            if src.dtype != want:
                raise CheckpointError(f"{src.block.where} is {src.dtype}, the format requires {want}")
            return None
        if isinstance(owner, QuantLinear):
            if leaf != "weight":
                return None  # a bias
            codes_name, scale_name, bits = f"{owner_name}.qweight", f"{owner_name}.weight_scale", owner.bits
        else:
            codes_name, scale_name, bits = name, f"{name}_scale", owner.bits_of(leaf)
        if src.dtype in (torch.int8, torch.uint8):
            want = torch.int8 if bits == 8 else torch.uint8
            if src.dtype != want:
                raise CheckpointError(f"{src.block.where} holds {src.dtype} codes, but this layer is int{bits} "
                                      f"here (expected {want}); is quantization_config right?")
            codes = src.read()
            return {codes_name: codes if bits == 8 else pack.repack_int4_for_kernel(codes, owner.group_size)}
        if len(src.shape) != 2:
            raise CheckpointError(f"{src.block.where} has shape {list(src.shape)}; a quantised weight is a matrix")
        n, k = src.shape
        step = max(1, ROW_CHUNK_ELEMS // max(k, 1))
        parts = [quantize_rows(src.read_rows(r, min(r + step, n), torch.float32), bits, owner.group_size)
                 for r in range(0, n, step)]
        return {codes_name: torch.cat([c for c, _ in parts]), scale_name: torch.cat([s for _, s in parts])}


def quant_hooks(raw: Mapping[str, Any], quantize: Any, dtype: torch.dtype, source: str,
                hooks: LoadHooks | None = None) -> tuple[LoadHooks, QuantConfig]:
    """Hooks that make ``load_pretrained`` return a quantised model (``dtype``: of the unquantised parts and the
    activations). A caller's ``select`` is kept; its own ``prepare``/``transform`` cannot be combined."""
    if hooks is not None and (hooks.prepare is not None or hooks.transform is not None):
        raise ValueError("quantize= cannot be combined with a caller's prepare/transform hooks")
    qcfg = resolve_quant_config(raw, quantize, source)
    quantizer = _Quantizer(qcfg)
    return LoadHooks(prepare=lambda model: quantizer.prepare(model, dtype), select=hooks.select if hooks else None,
                     transform=quantizer, stored_shape=quantizer.stored_shape), qcfg


def is_quantized_checkpoint(path: str | os.PathLike[str]) -> bool:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    quant = json.loads(config_file.read_text()).get("quantization_config")
    return isinstance(quant, Mapping) and quant.get("quant_method") == QUANT_METHOD


def load_quantized(path: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None,
                   quantize: str | int | QuantConfig | None = None,
                   device: str | torch.device = "cpu") -> DeepSeekMoEForCausalLM:
    """``deepseek_moe.from_pretrained(path, dtype=..., quantize=...)`` for a model that must come out quantised."""
    if quantize is None and not is_quantized_checkpoint(path):
        raise ValueError(f"{path}: not a quantised checkpoint and no quantize= given")
    return load_pretrained(path, dtype=dtype, device=device, quantize=quantize)


def quantize_checkpoint(src: str | os.PathLike[str], out: str | os.PathLike[str], qcfg: QuantConfig) -> Path:
    """Write ``out``, the quantised form of checkpoint ``src`` (read tensor by tensor and quantised while
    streaming; the quantised model is held, then written). An already-quantised ``src`` with the same bits is
    copied; other bits are an error. Either way ``out`` is replaced in one step (io/atomic.py): whatever
    checkpoint it held before (a stale index, more shards) is gone, other files are kept."""
    src, out = Path(src), Path(out)
    raw, _ = read_config(src)
    stored = stored_quant_config(raw, str(src / "config.json"))
    if stored is not None:
        resolve_quant_config(raw, qcfg, str(src))  # raises on other bits
        if src.resolve() != out.resolve():
            with staged_checkpoint(out, replaces=replaced_by_a_save) as stage:
                shutil.copytree(src, stage, dirs_exist_ok=True)
        return out
    model = load_pretrained(src, quantize=qcfg)
    extras = [src / n for n in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")]
    save_pretrained(model, out, extra_files=[p for p in extras if p.is_file()])
    return out
