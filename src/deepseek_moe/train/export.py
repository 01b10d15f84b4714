"""A run's ``model/`` directory: the Hugging Face checkpoint, or our own names for a config transformers lacks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from deepseek_moe.config import ModelConfig
from deepseek_moe.train.rundir import write_json


def hf_incompatibility(cfg: ModelConfig) -> str | None:
    """Why transformers' DeepSeek classes cannot hold this model, or None when they can."""
    from deepseek_moe.io import config_to_hf

    try:
        config_to_hf(cfg)
    except ValueError as e:
        return str(e)
    return None


def save_model(model: Any, path: Path, log: Callable[[str], None]) -> None:
    """The Hugging Face checkpoint; for a config transformers cannot express, our own names and config.json."""
    from deepseek_moe.io import save_pretrained

    reason = hf_incompatibility(model.config)
    if reason is None:
        save_pretrained(model, path)
        return
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "deepseek_moe"})
    write_json(path / "config.json", {"format": "deepseek_moe", **model.config.to_dict()})
    model.tokenizer.save(str(path / "tokenizer.json"))
    log(f"note: {reason}; wrote {path} with this package's parameter names instead of the Hugging Face ones")


__all__ = ["hf_incompatibility", "save_model"]
