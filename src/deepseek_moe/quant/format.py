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

This module registers the format with ``deepseek_moe.io`` (io/formats.py): io's one writer stores our quantised
modules' tensors under those keys, and io's streaming loader reads them with the hooks of ``quant/load.py``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deepseek_moe.io.formats import WeightFormat, register_format
from deepseek_moe.io.hf import ours_to_hf
from deepseek_moe.io.save import save_pretrained
from deepseek_moe.io.streaming import LoadHooks
from deepseek_moe.quant import pack
from deepseek_moe.quant.apply import quant_config_of
from deepseek_moe.quant.config import QUANT_METHOD
from deepseek_moe.quant.load import quant_hooks
from deepseek_moe.quant.modules import QuantLinear, QuantRoutedExperts

if TYPE_CHECKING:
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

SCALE_SUFFIX = "_scale"


def stored_name(name: str) -> str:
    """The plain name a quantised tensor is stored under: codes under their weight's (``X.qweight`` ->
    ``X.weight``); scales keep theirs (``X.weight_scale``, the loader's companion rule)."""
    return name.removesuffix("qweight") + "weight" if name.endswith(".qweight") else name


def hf_key_of(name: str) -> tuple[str, bool] | None:
    """Hugging Face key template (``{e}`` when stacked) for one of our state-dict names, quantised ones
    included: ``X.qweight`` -> key of ``X.weight``; ``X.weight_scale`` / ``...experts.w1_scale`` -> that
    weight's key + ``_scale`` (io/hf.py's companion rule)."""
    return ours_to_hf(stored_name(name))


def stored_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """int4 codes in the portable layout (the kernel's order is produced at load); everything else as held."""
    owner = model.get_submodule(name.rpartition(".")[0])
    if tensor.dtype != torch.uint8 or not isinstance(owner, QuantLinear | QuantRoutedExperts):
        return tensor
    if tensor.dim() == 3:  # all experts at once (our own layout stores the stacked tensor)
        return torch.stack([pack.portable_from_kernel_layout(t, owner.group_size) for t in tensor])
    return pack.portable_from_kernel_layout(tensor, owner.group_size)


def _config_of(model: nn.Module) -> dict[str, Any] | None:
    qcfg = quant_config_of(model)
    return qcfg.to_hf() if qcfg is not None else None


def _load_hooks(raw: Mapping[str, Any], quantize: Any, dtype: torch.dtype, source: str,
                hooks: LoadHooks | None) -> LoadHooks:
    return quant_hooks(raw, quantize, dtype, source, hooks)[0]


# The loader and the writer of deepseek_moe.io read and write this format through the registry (io/formats.py):
# io itself knows nothing of quantisation.
FORMAT = WeightFormat(quant_method=QUANT_METHOD, load_hooks=_load_hooks, config_of=_config_of,
                      stored_name=stored_name, stored_tensor=stored_tensor, takes_quantize=True,
                      runs_on_cpu_only=True)
register_format(FORMAT)


def save_quantized(model: DeepSeekMoEForCausalLM, path: str | os.PathLike[str], *,
                   max_shard_size: int | str = "5GB", extra_files: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Write a quantised model: ``deepseek_moe.save_pretrained`` (the one writer: config.json with
    quantization_config, safetensors shards, tokenizer.json, written atomically), refusing a plain model."""
    if quant_config_of(model) is None:
        raise ValueError("save_quantized: the model is not quantised (quantize_model or from_pretrained(quantize=))")
    save_pretrained(model, path, max_shard_size=max_shard_size, extra_files=extra_files)
