"""The quantised checkpoint format: Hugging Face key names, codes and scales side by side.

| tensor | key | dtype, shape |
|---|---|---|
| int8 weight | ``<hf name>.weight`` (unchanged name) | int8 (out, in) |
| its scale | ``<hf name>.weight_scale`` | float32 (out,) |
| int4 weight | ``<hf name>.weight`` | uint8 (out, in/2): byte j = column 2j (low nibble), 2j+1 (high), code + 8 |
| its scale | ``<hf name>.weight_scale`` | float16 (out, in/group_size) |
| everything else | as in any checkpoint | the unquantised dtype (config.json ``dtype``) |

config.json carries ``quantization_config`` (:meth:`QuantConfig.to_hf`). A weight is dequantised as
``code * scale`` (per row for int8, per group of ``group_size`` columns for int4). The int4 layout is the plain
two-per-byte one any tool can read; the CPU kernel's order is produced at load.

This module maps names between our quantised modules and those keys, and writes the format. Loading is in
``quant/load.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from deepseek_moe.io.hf import config_to_hf, ours_to_hf
from deepseek_moe.quant import pack
from deepseek_moe.quant.apply import quant_config_of
from deepseek_moe.quant.modules import QuantLinear, QuantRoutedExperts
from deepseek_moe.quant.stfile import Entry, row_chunks, write_safetensors

if TYPE_CHECKING:
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

SCALE_SUFFIX = "_scale"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def hf_key_of(name: str) -> tuple[str, bool] | None:
    """Hugging Face key template (``{e}`` when stacked) for one of our state-dict names, quantised ones
    included: ``X.qweight`` -> key of ``X.weight``; ``X.weight_scale`` / ``...experts.w1_scale`` -> that
    weight's key + ``_scale``."""
    if name.endswith(".qweight"):
        return ours_to_hf(name.removesuffix("qweight") + "weight")
    if name.endswith(SCALE_SUFFIX):
        base = ours_to_hf(name.removesuffix(SCALE_SUFFIX))
        return None if base is None else (base[0] + SCALE_SUFFIX, base[1])
    return ours_to_hf(name)


def _portable(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    return pack.portable_from_kernel_layout(codes, group_size) if codes.dtype == torch.uint8 else codes


def _entries(model: DeepSeekMoEForCausalLM) -> Iterator[Entry]:
    """What save writes, in model order: every mapped tensor, stacked experts split per expert."""
    cfg = model.config
    seen: set[int] = set()
    quant_modules = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear | QuantRoutedExperts)}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if cfg.tie_word_embeddings and name == "head.weight":
            continue
        mapped = hf_key_of(name)
        if mapped is None:
            if isinstance(tensor, nn.Parameter):
                raise ValueError(f"model parameter {name!r} has no Hugging Face name in io/hf.py KEY_TABLE")
            continue
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        key, stacked = mapped
        owner = quant_modules.get(name.rpartition(".")[0])
        group = owner.group_size if owner is not None else 0
        t = tensor.detach()
        slices = [(key.replace("{e}", str(e)), t[e]) for e in range(t.shape[0])] if stacked else [(key, t)]
        for k, part in slices:
            shape = tuple(part.shape)
            if part.dtype == torch.uint8 and owner is not None:
                yield Entry(k, torch.uint8, shape, partial(_chunks, part, partial(_portable, group_size=group)))
            else:
                yield Entry(k, part.dtype, shape, partial(_chunks, part, _same))
    for i in range(cfg.n_dense_layers, cfg.n_layers):
        if cfg.moe.score_func == "sigmoid" and not cfg.moe.use_routing_bias:
            zeros = torch.zeros(cfg.moe.n_routed_experts)
            yield Entry(f"model.layers.{i}.mlp.gate.e_score_correction_bias", torch.float32, tuple(zeros.shape),
                        partial(_chunks, zeros, _same))
        if cfg.moe.n_shared_experts == 0:
            dtype = model.embed.weight.dtype
            prefix = f"model.layers.{i}.mlp.shared_experts."
            for k, shape in (("gate_proj", (0, cfg.dim)), ("up_proj", (0, cfg.dim)), ("down_proj", (cfg.dim, 0))):
                yield Entry(prefix + k + ".weight", dtype, shape, list)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _chunks(t: torch.Tensor, convert: Callable[[torch.Tensor], torch.Tensor]) -> Iterable[torch.Tensor]:
    if t.dim() == 0:
        yield t.reshape(1)
        return
    for rows in row_chunks(t.shape[0], t[0].numel() if t.shape[0] else 0):
        yield convert(t[rows].cpu())


def save_quantized(model: DeepSeekMoEForCausalLM, path: str | os.PathLike[str]) -> None:
    """Write a quantised model as config.json (with quantization_config), model.safetensors, tokenizer.json."""
    qcfg = quant_config_of(model)
    if qcfg is None:
        raise ValueError("save_quantized: the model is not quantised (quantize_model or from_pretrained(quantize=))")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = _DTYPE_NAMES.get(model.embed.weight.dtype)
    hf_cfg = config_to_hf(model.config, dtype=dtype)
    hf_cfg["quantization_config"] = qcfg.to_hf()
    for stale in list(path.glob("model*.safetensors")) + [path / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    write_safetensors(path / "model.safetensors", list(_entries(model)))
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(str(path / "tokenizer.json"))
