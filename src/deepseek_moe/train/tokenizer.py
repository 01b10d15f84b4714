"""Byte-level BPE trained on the training split with ``tokenizers``, cached by corpus hash and vocab size."""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from deepseek_moe import env
from deepseek_moe.train.corpus import Corpus

EOS = "<|endoftext|>"  # separates documents; id 0


def default_cache_dir() -> Path:
    """The cache root (``$DEEPSEEK_MOE_CACHE``, see ``deepseek_moe.env``); tokenizers go to its tokenizers/."""
    return env.cache_root()


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def get_tokenizer(corpus: Corpus, vocab_size: int, cache_dir: Path) -> Tokenizer:
    """The tokenizer for ``corpus``: loaded from the cache, or trained on its training split and cached."""
    path = cache_dir / "tokenizers" / f"{corpus.sha256[:20]}-v{vocab_size}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = train_tokenizer([d.text for d in corpus.train], vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok


__all__ = ["EOS", "default_cache_dir", "get_tokenizer", "train_tokenizer"]
