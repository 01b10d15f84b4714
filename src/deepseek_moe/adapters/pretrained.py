"""Loading a checkpoint with adapters applied, and merging adapters into a new checkpoint in the base's layout."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepseek_moe.adapters.peft import load_adapter
from deepseek_moe.adapters.targets import merge_lora
from deepseek_moe.io.load import load_pretrained
from deepseek_moe.io.locate import checkpoint_dir
from deepseek_moe.io.save import save_pretrained
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.quant import quant_config_of

# Files of a checkpoint besides its weights and config that a merged copy keeps (tokenizer, chat template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def from_pretrained(path: str | os.PathLike[str], *, adapters: Sequence[str | os.PathLike[str]] = (),
                    **kwargs: Any) -> DeepSeekMoEForCausalLM:
    """``io.load_pretrained(path, **kwargs)``, then each adapter directory (PEFT's format) in ``adapters``
    applied unmerged, in float32 beside the base's weights. Two adapters on one module are refused (merge the
    first into a checkpoint, then apply the second)."""
    model = load_pretrained(path, **kwargs)
    for adapter in adapters:
        load_adapter(model, adapter)
    return model


def merge_checkpoint(base: str | os.PathLike[str], adapter: str | os.PathLike[str],
                     out: str | os.PathLike[str]) -> str:
    """Write ``base`` with ``adapter`` folded into its weights to ``out``, in the base's layout and dtype, with its
    tokenizer files; returns the format written (io/save.py)."""
    src = checkpoint_dir(base)
    dst = Path(out)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"OUT ({dst}) is the base checkpoint itself; choose another directory")
    model = load_pretrained(src)
    if quant_config_of(model) is not None:
        raise ValueError(f"{src} is quantised: merge into the full-precision base it was made from")
    load_adapter(model, adapter)
    merge_lora(model)
    written = save_pretrained(model, dst)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copyfile(src / name, dst / name)
    return written
