"""What a run is built from, before the first step: the data, the model config, autocast and seeds.

    data = load_data(cfg)                      corpus → tokenizer → token arrays (all cached) → batches
    model_cfg = build_model_config(cfg, ...)   the preset with the run's overrides and the tokenizer's vocabulary
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from deepseek_moe.config import ModelConfig
from deepseek_moe.train.config import TrainConfig
from deepseek_moe.train.corpus import Corpus, load_corpus
from deepseek_moe.train.data import PackedSequences, cached_tokens, tokenizer_sha256, unigram_entropy
from deepseek_moe.train.errors import TrainError
from deepseek_moe.train.tokenizer import EOS, default_cache_dir, get_tokenizer


@dataclass(frozen=True)
class Precision:
    """How a run computes: ``amp`` is the autocast dtype (None: fp32 throughout); ``reason`` says why, for the
    log and config.json. Master weights and optimizer state are fp32 either way."""

    amp: torch.dtype | None
    reason: str

    @property
    def name(self) -> str:
        return "bf16" if self.amp is not None else "fp32"

    def describe(self) -> dict[str, str]:
        return {"dtype": self.name, "reason": self.reason}


def resolve_precision(dtype: str, device: torch.device) -> Precision:
    """``dtype`` "bf16"/"fp32" as asked; "auto": bf16 autocast where the device multiplies bf16 natively (CUDA,
    CPUs with AVX512-BF16 or AMX), fp32 elsewhere (emulated bf16 would be slower and less accurate)."""
    from deepseek_moe.device import native_bf16

    if dtype == "bf16":
        return Precision(torch.bfloat16, "bf16 autocast (asked for)")
    if dtype == "fp32":
        return Precision(None, "fp32 (asked for)")
    feature = native_bf16(device)
    if feature is not None:
        return Precision(torch.bfloat16, f"bf16 autocast (auto: {device.type} has native bf16, {feature})")
    return Precision(None, f"fp32 (auto: {device.type} has no native bf16 matrix products)")


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of :func:`resolve_precision`; None runs in fp32."""
    return resolve_precision(dtype, device).amp


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model_config(cfg: TrainConfig, vocab_size: int, eos_id: int | None) -> ModelConfig:
    from deepseek_moe.presets import get_preset

    try:
        base = get_preset(cfg.model.preset)
    except (KeyError, ValueError) as e:
        raise TrainError(f"model.preset ({cfg.model.preset!r}) is not a preset: {e}") from e
    data = base.to_dict()
    for key, value in cfg.model.overrides.items():
        data[key] = {**data["moe"], **value} if key == "moe" else value
    data["vocab_size"] = vocab_size  # always the tokenizer's
    data["max_seq_len"] = max(data["max_seq_len"], cfg.data.seq_len)
    data["eos_token_id"] = eos_id
    data["moe"]["seed"] = cfg.seed
    try:
        return ModelConfig.from_dict(data)
    except ValueError as e:
        raise TrainError(f"model config (preset {cfg.model.preset!r} with model.overrides): {e}") from e


@dataclass
class TrainData:
    """The run's text, tokenizer and batches. ``train`` holds the resumable data position."""

    corpus: Corpus
    tokenizer: Tokenizer
    tokenizer_sha256: str
    train: PackedSequences
    val: PackedSequences
    n_train_tokens: int
    n_val_tokens: int
    unigram_entropy: float  # of the validation split: the loss of the best context-free model

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def eos_id(self) -> int:
        eos = self.tokenizer.token_to_id(EOS)
        if eos is None:
            raise TrainError(f"the tokenizer has no {EOS} token")
        return int(eos)

    def describe(self) -> dict[str, Any]:
        """What config.json records about the data and the tokenizer."""
        return {"corpus": {**self.corpus.describe(), "train_tokens": self.n_train_tokens,
                           "val_tokens": self.n_val_tokens},
                "tokenizer": {"vocab_size": self.vocab_size, "sha256": self.tokenizer_sha256}}


def load_data(cfg: TrainConfig) -> TrainData:
    """Corpus → tokenizer (cached) → token arrays (cached, memory-mapped) → packed sequences."""
    cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()
    corpus = load_corpus(cfg.data.paths, text_field=cfg.data.text_field, val_fraction=cfg.data.val_fraction,
                         val_paths=cfg.data.val_paths)
    tok = get_tokenizer(corpus, cfg.data.vocab_size, cache_dir)
    tok_hash = tokenizer_sha256(tok)
    key = f"{corpus.sha256[:16]}-{tok_hash[:16]}"
    train_tokens = cached_tokens(corpus.train, tok, cache_dir, f"{key}-train")
    val_tokens = cached_tokens(corpus.val, tok, cache_dir, f"{key}-val")
    return TrainData(corpus, tok, tok_hash, PackedSequences(train_tokens, cfg.data.seq_len, cfg.seed),
                     PackedSequences(val_tokens, cfg.data.seq_len, cfg.seed), len(train_tokens), len(val_tokens),
                     unigram_entropy(val_tokens, tok.get_vocab_size()))


__all__ = ["Precision", "TrainData", "autocast", "autocast_dtype", "resolve_precision", "build_model_config", "load_data", "seed_everything"]
