"""Our own checkpoint format, for models no public format can express (softmax scores with the routing bias,
MLA with split-halves RoPE and softmax, MHA with expert groups, ...). ``save_pretrained`` writes it only then;
``load_pretrained`` reads it like any other layout.

| file | content |
|---|---|
| ``config.json`` | ``{"format": "deepseek_moe", "format_version": 1, "dtype": "<torch dtype name>", "config": {...}}``; ``config`` is ``ModelConfig.to_dict()`` (every field, the MoE config nested under ``moe``) |
| ``model.safetensors`` (or ``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``, as Hugging Face shards) | our parameter and persistent-buffer names (``layers.1.ffn.experts.w1`` is the stacked (E, F, D) tensor); a tied ``head.weight`` is left out; metadata ``{"format": "deepseek_moe"}`` |
| ``tokenizer.json`` | the tokenizer, when the model has one |

``config.json`` also holds ``"capacity_factors": {"<MoE layer name>": factor, ...}`` when a layer uses the
adaptive capacity factor (``capacity_policy="adaptive"``): the factor each layer had moved to when saved, which
``load_pretrained`` restores, so a reloaded model drops (``drop_at_inference``) and goes on adapting from where
training left it rather than from ``capacity_factor``, the start. It lives apart from ``config`` because it is
one value per layer, and apart from the weights for the reason the layer keeps it a Python float: no dtype cast
may round it. (The routing bias, the other state training moves, is a buffer and travels with the weights.)
Readers of version 1 without this key ignore it; a checkpoint without it restores the start factor.

Version 0 (written by train/loop.py before this format was documented) kept the config fields at the top level
of config.json beside ``"format"``; it is still read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from deepseek_moe.config import ModelConfig
from deepseek_moe.moe.all_layers import moe_layers

FORMAT = "deepseek_moe"
FORMAT_VERSION = 1
CAPACITY_KEY = "capacity_factors"


def is_native(raw: Mapping[str, Any]) -> bool:
    return raw.get("format") == FORMAT


def native_config(raw: Mapping[str, Any], *, source: str) -> ModelConfig:
    version = raw.get("format_version", 0)
    if version not in (0, FORMAT_VERSION):
        raise ValueError(f"{source}: format_version {version!r} of format {FORMAT!r} is newer than this package "
                         f"reads ({FORMAT_VERSION}); upgrade deepseek_moe")
    fields = raw.get("config") if version else {k: v for k, v in raw.items() if k not in ("format", "dtype")}
    if not isinstance(fields, Mapping):
        raise ValueError(f"{source}: 'config' must be a JSON object of ModelConfig fields")
    try:
        return ModelConfig.from_dict(dict(fields))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from err


def native_config_json(cfg: ModelConfig, *, dtype: str | None,
                       capacity_factors: Mapping[str, float] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict()}
    if dtype is not None:
        out["dtype"] = dtype
    if capacity_factors:
        out[CAPACITY_KEY] = dict(capacity_factors)
    return out


def adapted_capacity(model: nn.Module) -> dict[str, float]:
    """The factor each adaptive-capacity MoE layer of ``model`` drops against now, by qualified layer name
    (empty when no layer adapts)."""
    return {name: moe.capacity_now for name, moe in moe_layers(model) if moe.cfg.capacity_policy == "adaptive"}


def restore_capacity(model: nn.Module, raw: Mapping[str, Any], *, source: str) -> None:
    """Set each adaptive layer's factor to config.json's ``capacity_factors`` (see the module docstring); nothing
    without the key. ValueError naming ``source`` and the layer when a name is not an adaptive MoE layer of the
    model or a factor is not a number within the layer's [capacity_min, capacity_max]. A multi-token-prediction
    layer the model was built without (``mtp=False``) is skipped."""
    saved = raw.get(CAPACITY_KEY)
    if saved is None:
        return
    if not isinstance(saved, Mapping):
        raise ValueError(f"{source}: {CAPACITY_KEY} must be a JSON object of MoE layer name -> capacity factor, "
                         f"found {type(saved).__name__}")
    layers = {name: moe for name, moe in moe_layers(model) if moe.cfg.capacity_policy == "adaptive"}
    for name, factor in saved.items():
        moe = layers.get(name)
        if moe is None:
            if name.startswith("mtp."):
                continue
            raise ValueError(f"{source}: {CAPACITY_KEY}[{name!r}]: the model has no adaptive-capacity MoE layer of "
                             f"that name (it has {sorted(layers)})")
        lo, hi = moe.cfg.capacity_min, moe.cfg.capacity_max
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not math.isfinite(factor) \
                or not lo <= factor <= hi:
            raise ValueError(f"{source}: {CAPACITY_KEY}[{name!r}] ({factor!r}) must be a number within "
                             f"[capacity_min, capacity_max] = [{lo}, {hi}]")
        moe.capacity_now = float(factor)


__all__ = ["CAPACITY_KEY", "FORMAT", "FORMAT_VERSION", "adapted_capacity", "is_native", "native_config",
           "native_config_json", "restore_capacity"]
