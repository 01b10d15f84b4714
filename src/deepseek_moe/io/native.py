"""Our own checkpoint format, for models no public format can express (softmax scores with the routing bias,
MLA with split-halves RoPE and softmax, MHA with expert groups, ...). ``save_pretrained`` writes it only then;
``load_pretrained`` reads it like any other layout.

| file | content |
|---|---|
| ``config.json`` | ``{"format": "deepseek_moe", "format_version": 1, "dtype": "<torch dtype name>", "config": {...}}``; ``config`` is ``ModelConfig.to_dict()`` (every field, the MoE config nested under ``moe``) |
| ``model.safetensors`` (or ``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``, as Hugging Face shards) | our parameter and persistent-buffer names (``layers.1.ffn.experts.w1`` is the stacked (E, F, D) tensor); a tied ``head.weight`` is left out; metadata ``{"format": "deepseek_moe"}`` |
| ``tokenizer.json`` | the tokenizer, when the model has one |

Version 0 (written by train/loop.py before this format was documented) kept the config fields at the top level
of config.json beside ``"format"``; it is still read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deepseek_moe.config import ModelConfig

FORMAT = "deepseek_moe"
FORMAT_VERSION = 1


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


def native_config_json(cfg: ModelConfig, *, dtype: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict()}
    if dtype is not None:
        out["dtype"] = dtype
    return out


__all__ = ["FORMAT", "FORMAT_VERSION", "is_native", "native_config", "native_config_json"]
