"""Several LoRA adapters over one base model: ``deepseek-moe serve --adapter NAME=PATH`` (repeatable), each
selected per request by its ``model`` name.

Each adapter runs as a copy of the base model's module tree that shares every base tensor (parameters, buffers and
any other tensor a module holds) with the base, with that adapter's low-rank pairs added unmerged
(``adapters.peft.load_adapter``). An adapter so costs its pairs, not another copy of the weights, and the base
model itself is left without adapters. The scheduler groups a step's rows by adapter and runs each group through
its copy: one forward per adapter present in the step rather than a per-row LoRA kernel, which keeps the
adapted modules exactly those ``generate --adapter`` runs.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from deepseek_moe.adapters.peft import load_adapter, read_adapter_config


def adapted_copy(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """A copy of ``model`` that shares all of its tensors, with the adapter at ``path`` (PEFT's format) applied
    unmerged; ``model`` itself is unchanged."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor):
                memo[id(value)] = value
        for table in (module._parameters, module._buffers):
            for t in table.values():
                if t is not None:
                    memo[id(t)] = t
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        memo[id(tokenizer)] = tokenizer
    clone = copy.deepcopy(model, memo)
    load_adapter(clone, path)
    return clone.eval()


def check_adapters(specs: Sequence[tuple[str, str | os.PathLike[str]]], *, reserved: Sequence[str] = ()) -> None:
    """Before loading anything: each (name, path) has a distinct name, none of ``reserved`` (the base model's
    served name), and a readable LoRA ``adapter_config.json``. Raises ValueError naming the adapter."""
    seen: set[str] = set()
    for name, path in specs:
        if not name:
            raise ValueError(f"adapter {path}: its name is empty")
        if name in seen or name in reserved:
            raise ValueError(f"adapter {name}={path}: the name {name!r} is already taken "
                             f"({'by the base model' if name in reserved else 'by another adapter'})")
        seen.add(name)
        try:
            read_adapter_config(Path(path))
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"adapter {name}={path}: {e}") from e


def load_adapters(model: nn.Module, specs: Sequence[tuple[str, str | os.PathLike[str]]], *,
                  reserved: Sequence[str] = ()) -> dict[str, nn.Module]:
    """Name -> adapted copy of ``model`` for each (name, path), checked as ``check_adapters`` does."""
    check_adapters(specs, reserved=reserved)
    out: dict[str, nn.Module] = {}
    for name, path in specs:
        try:
            out[name] = adapted_copy(model, path)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"adapter {name}={path}: {e}") from e
    return out
