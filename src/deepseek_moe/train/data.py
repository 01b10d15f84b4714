"""Token arrays and batches: tokenised once into a cached, memory-mapped array, packed into fixed-length
sequences and shuffled by a seeded permutation per epoch. The batch position is part of the resumable state.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from deepseek_moe.train.corpus import Document
from deepseek_moe.train.errors import TrainError
from deepseek_moe.train.tokenizer import EOS


def tokenizer_sha256(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def tokenize(docs: tuple[Document, ...], tok: Tokenizer) -> np.ndarray:
    """All documents' ids, each followed by EOS, as uint16 (uint32 for vocabularies over 65536)."""
    eos = tok.token_to_id(EOS)
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    parts = []
    for enc in tok.encode_batch([d.text for d in docs], add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=dtype))
        parts.append(np.asarray([eos], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def cached_tokens(docs: tuple[Document, ...], tok: Tokenizer, cache_dir: Path, key: str) -> np.ndarray:
    """``tokenize``, memoised as ``.npy`` under ``cache_dir/tokens`` and memory-mapped read-only."""
    path = cache_dir / "tokens" / f"{key}.npy"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
        np.save(tmp, tokenize(docs, tok))
        os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the empirical unigram distribution: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@dataclass
class PackedSequences:
    """Non-overlapping sequences of ``seq_len`` tokens, visited in a new seeded order every epoch.

    Labels are the inputs themselves (the model shifts them), so a sequence is ``seq_len`` tokens.
    """

    tokens: np.ndarray
    seq_len: int
    seed: int
    epoch: int = 0
    position: int = 0  # sequences already taken from this epoch's order

    def __post_init__(self) -> None:
        self.n_sequences = len(self.tokens) // self.seq_len
        if self.n_sequences == 0:
            raise TrainError(f"the data has {len(self.tokens)} tokens, fewer than one sequence of seq_len "
                             f"({self.seq_len}); add text or lower data.seq_len")
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_sequences)

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """(B, seq_len) int64; wraps into the next epoch (and its order) when this one runs out."""
        index: list[int] = []
        while len(index) < batch_size:
            if self.position == self.n_sequences:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(batch_size - len(index), self.n_sequences - self.position)
            index.extend(self._order[self.position:self.position + take].tolist())
            self.position += take
        return self._gather(index)

    def _gather(self, index: list[int]) -> torch.Tensor:
        rows = [np.asarray(self.tokens[i * self.seq_len:(i + 1) * self.seq_len], dtype=np.int64) for i in index]
        return torch.from_numpy(np.stack(rows))

    def fixed_batches(self, batch_size: int, n_batches: int | None = None) -> list[torch.Tensor]:
        """For validation, the same every time: ``n_batches`` batches of sequences spread evenly over the data
        (so every part of it is represented), or all sequences when None."""
        n = self.n_sequences if n_batches is None else min(self.n_sequences, batch_size * n_batches)
        index = np.unique(np.linspace(0, self.n_sequences - 1, n).round().astype(np.int64)).tolist()
        return [self._gather(index[i:i + batch_size]) for i in range(0, len(index), batch_size)]

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / self.n_sequences

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "n_sequences": self.n_sequences}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n_sequences"] != self.n_sequences or state["seed"] != self.seed:
            raise TrainError(f"the checkpoint's data position is for {state['n_sequences']} sequences (seed "
                             f"{state['seed']}), but the data now has {self.n_sequences} (seed {self.seed}): "
                             "the data or seq_len changed since the run started")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


__all__ = ["PackedSequences", "cached_tokens", "tokenize", "tokenizer_sha256", "unigram_entropy"]
