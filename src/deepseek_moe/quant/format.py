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

This module maps names between our quantised modules and those keys, and writes the format through
io/save.py's writer; loading goes through io's streaming loader with the hooks of ``quant/load.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from deepseek_moe.io.hf import config_to_hf, ours_to_hf
from deepseek_moe.quant import pack
from deepseek_moe.quant.apply import quant_config_of
from deepseek_moe.quant.modules import QuantLinear, QuantRoutedExperts

if TYPE_CHECKING:
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

SCALE_SUFFIX = "_scale"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def hf_key_of(name: str) -> tuple[str, bool] | None:
    """Hugging Face key template (``{e}`` when stacked) for one of our state-dict names, quantised ones
    included: ``X.qweight`` -> key of ``X.weight``; ``X.weight_scale`` / ``...experts.w1_scale`` -> that
    weight's key + ``_scale`` (io/hf.py's companion rule)."""
    if name.endswith(".qweight"):
        return ours_to_hf(name.removesuffix("qweight") + "weight")
    return ours_to_hf(name)


def _entries(model: DeepSeekMoEForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) in model order; stacked experts split per expert; int4 codes in the portable layout."""
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
        t = tensor.detach()
        for k, part in ([(key.replace("{e}", str(e)), t[e]) for e in range(t.shape[0])] if stacked else [(key, t)]):
            if part.dtype == torch.uint8 and owner is not None:
                part = pack.portable_from_kernel_layout(part, owner.group_size)
            yield k, part.clone() if stacked else part  # a slice shares the stacked storage
    for i in range(cfg.n_dense_layers, cfg.n_layers):
        if cfg.moe.score_func == "sigmoid" and not cfg.moe.use_routing_bias:
            yield f"model.layers.{i}.mlp.gate.e_score_correction_bias", torch.zeros(cfg.moe.n_routed_experts)
        if cfg.moe.n_shared_experts == 0:
            dtype = model.embed.weight.dtype
            prefix = f"model.layers.{i}.mlp.shared_experts."
            yield prefix + "gate_proj.weight", torch.zeros(0, cfg.dim, dtype=dtype)
            yield prefix + "up_proj.weight", torch.zeros(0, cfg.dim, dtype=dtype)
            yield prefix + "down_proj.weight", torch.zeros(cfg.dim, 0, dtype=dtype)


def save_quantized(model: DeepSeekMoEForCausalLM, path: str | os.PathLike[str], *,
                   max_shard_size: int | str = "5GB", extra_files: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Write a quantised model: config.json (with quantization_config), safetensors shards, tokenizer.json.
    Written by io/save.py's writer (atomic: built beside ``path``, swapped into place in one step)."""
    from deepseek_moe.io.save import parse_size, write_checkpoint

    qcfg = quant_config_of(model)
    if qcfg is None:
        raise ValueError("save_quantized: the model is not quantised (quantize_model or from_pretrained(quantize=))")
    config = config_to_hf(model.config, dtype=_DTYPE_NAMES.get(model.embed.weight.dtype))
    config["quantization_config"] = qcfg.to_hf()
    write_checkpoint(Path(path), _entries(model), config, parse_size(max_shard_size), getattr(model, "tokenizer", None),
                     metadata={"format": "pt"}, extra_files=extra_files)
