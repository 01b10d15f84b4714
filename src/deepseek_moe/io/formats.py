"""Weight formats that packages above ``io`` plug into the one loader and the one writer.

``io`` knows nothing of quantisation: a package with its own weight format (``deepseek_moe.quant``, whose
config.json says ``quantization_config.quant_method: "deepseek_moe"``) registers a :class:`WeightFormat` when
it is imported (``import deepseek_moe`` imports it). The loader then asks the format for the hooks that build and
fill its modules (io/streaming.py's ``LoadHooks``); the writer asks which models are in it, what their
``quantization_config`` is, and how each of their tensors is stored. Everything else (layouts, key names,
shards, atomic writes) stays the loader's and the writer's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepseek_moe.io.streaming import LoadHooks


def _same_name(name: str) -> str:
    return name


def _same_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True, kw_only=True)
class WeightFormat:
    """One registered weight format.

    ``load_hooks(raw, quantize, dtype, source, hooks)``: the hooks that load a checkpoint into this format
    (``raw``: config.json; ``quantize``: what ``load_pretrained(quantize=...)`` was given, or None for a
    checkpoint stored in it; ``dtype``: of the unconverted parts; ``hooks``: the caller's, whose ``select`` is
    kept). ``config_of(model)``: the ``quantization_config`` to write for a model in this format, None for a
    model that is not. ``stored_name(name)``: which of our plain names a tensor of the model is stored under
    (``X.qweight`` -> ``X.weight``); ``stored_tensor(model, name, tensor)``: its data as the files hold it.
    ``takes_quantize``: this format is the one ``load_pretrained(quantize=...)`` converts to.
    """

    quant_method: str
    load_hooks: Callable[[Mapping[str, Any], Any, torch.dtype, str, LoadHooks | None], LoadHooks]
    config_of: Callable[[nn.Module], Mapping[str, Any] | None]
    stored_name: Callable[[str], str] = _same_name
    stored_tensor: Callable[[nn.Module, str, torch.Tensor], torch.Tensor] = _same_tensor
    takes_quantize: bool = False
    runs_on_cpu_only: bool = False


_FORMATS: dict[str, WeightFormat] = {}


def register_format(fmt: WeightFormat) -> None:
    """Make ``fmt`` known to the loader and the writer (a second registration of one method replaces it)."""
    _FORMATS[fmt.quant_method] = fmt


def registered_methods() -> tuple[str, ...]:
    return tuple(_FORMATS)


def format_of_method(method: Any) -> WeightFormat | None:
    """The format a config.json's ``quantization_config.quant_method`` names, if one is registered."""
    return _FORMATS.get(method) if isinstance(method, str) else None


def format_of_config(raw: Mapping[str, Any]) -> WeightFormat | None:
    quant = raw.get("quantization_config")
    return format_of_method(quant.get("quant_method")) if isinstance(quant, Mapping) else None


def format_of_model(model: nn.Module) -> tuple[WeightFormat, Mapping[str, Any]] | None:
    """The format ``model`` is in and its ``quantization_config``, or None for a plain model."""
    for fmt in _FORMATS.values():
        config = fmt.config_of(model)
        if config is not None:
            return fmt, config
    return None


def quantizing_format() -> WeightFormat:
    """The format ``load_pretrained(quantize=...)`` converts to."""
    for fmt in _FORMATS.values():
        if fmt.takes_quantize:
            return fmt
    raise ValueError("quantize= needs deepseek_moe.quant, which registers the quantised format (import deepseek_moe "
                     "does so)")


__all__ = ["WeightFormat", "format_of_config", "format_of_method", "format_of_model", "quantizing_format",
           "register_format", "registered_methods"]
