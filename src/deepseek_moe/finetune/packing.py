"""Packing examples into rows of ``seq_len`` tokens without attention or loss crossing examples.

A packed batch is one (B, 3, T) int64 tensor, so that the trainer's row split and batching see a plain tensor:
``[:, 0]`` token ids, ``[:, 1]`` labels (-100 where no loss: outside the loss mask, each example's first token,
which would be predicted from the previous example, and padding), ``[:, 2]`` example ids (1, 2, ... within the
row; 0 is padding). :func:`packed_forward` turns the example ids into positions that restart at 0 for each example
and a block-diagonal causal mask, and runs the model's own masked forward (``forward_logits``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from deepseek_moe.finetune.data import Example
from deepseek_moe.model.causal_lm import IGNORE_INDEX, CausalLMOutput, DeepSeekMoEForCausalLM
from deepseek_moe.model.mtp import mtp_loss
from deepseek_moe.moe.all_layers import collect_aux_loss, moe_layers
from deepseek_moe.train.data import PackedSequences


def pack(examples: Iterable[Example], seq_len: int) -> Iterator[np.ndarray]:
    """(3, seq_len) rows, filled in order: an example that does not fit the rest of a row starts the next one; an
    example longer than a row is split into row-long pieces, each its own example."""
    ids = np.zeros(seq_len, np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, np.int64)
    docs = np.zeros(seq_len, np.int64)
    used, n_docs = 0, 0
    for ex in examples:
        for start in range(0, len(ex.ids), seq_len):
            piece, mask = ex.ids[start:start + seq_len], ex.loss_mask[start:start + seq_len]
            n = len(piece)
            if used + n > seq_len:
                yield np.stack([ids, labels, docs])
                ids, labels, docs = np.zeros_like(ids), np.full_like(labels, IGNORE_INDEX), np.zeros_like(docs)
                used, n_docs = 0, 0
            n_docs += 1
            ids[used:used + n] = piece
            labels[used:used + n] = np.where(mask, piece, IGNORE_INDEX)
            labels[used] = IGNORE_INDEX  # predicted from the previous example's last token: no loss
            docs[used:used + n] = n_docs
            used += n
    if used:
        yield np.stack([ids, labels, docs])


def write_rows(rows: Iterator[np.ndarray], path: Path, seq_len: int) -> np.ndarray:
    """Stream rows to ``path`` (.npy, renamed into place once whole) and map it read-only: (N, 3, seq_len)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_name(f"{path.name}.tmp{os.getpid()}")
    n = 0
    with raw.open("wb") as f:
        for row in rows:
            f.write(row.astype(np.int32).tobytes())
            n += 1
    # The row count is known only now: copy into an .npy of that shape a block of rows at a time, so memory holds
    # one block, never the data set.
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(n, 3, seq_len))
    if n:
        rows_in = np.memmap(raw, dtype=np.int32, mode="r", shape=(n, 3, seq_len))
        block = max(1, (64 << 20) // (12 * seq_len))
        for start in range(0, n, block):
            out[start:start + block] = rows_in[start:start + block]
        del rows_in
    out.flush()
    del out
    raw.unlink()
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


class PackedRows(PackedSequences):
    """PackedSequences over packed rows (N, 3, T): the same seeded epoch order and resumable position."""

    def __post_init__(self) -> None:
        self.n_sequences = len(self.tokens)
        if self.n_sequences == 0:
            from deepseek_moe.train.errors import TrainError

            raise TrainError("the fine-tuning data holds no usable example")
        self._order = self._permutation(self.epoch)

    def _gather(self, index: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(self.tokens[i], dtype=np.int64) for i in index]))


def positions_and_mask(docs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) positions restarting at each example and the (B, 1, T, T) mask: a token sees the earlier tokens of
    its own example; padding sees only itself (one finite score, as the model's own padding mask does)."""
    B, T = docs.shape
    t = torch.arange(T, device=docs.device)
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
    positions = t - first
    same = docs[:, :, None] == docs[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=docs.device).tril()
    real = docs > 0
    mask = (same & causal & real[:, :, None]) | torch.eye(T, dtype=torch.bool, device=docs.device)
    return positions, mask[:, None]


def packed_forward(model: DeepSeekMoEForCausalLM, batch: torch.Tensor) -> CausalLMOutput:
    """The model on a packed batch (B, 3, T): logits, and losses as ``forward(labels=...)`` gives them (the mean
    cross-entropy over labelled tokens, plus the balance losses)."""
    ids, labels, docs = batch[:, 0], batch[:, 1], batch[:, 2]
    positions, mask = positions_and_mask(docs)
    real = docs > 0
    token_mask = None if bool(real.all()) else real
    protected = (model.protected_sequences.draw() if any(moe.drops_tokens for _, moe in moe_layers(model))
                 else None)
    hidden = model.forward_hidden(ids, positions, mask, token_mask=token_mask, protected=protected)
    logits, ce = model.next_token_loss(hidden, labels)
    mtp = None
    if len(model.mtp):  # BASE's MTP modules, within each example (positions, mask and targets never cross one)
        mtp = mtp_loss(model.mtp_train_logits(ids, hidden, positions, mask, token_mask=token_mask,
                                              protected=protected), labels, IGNORE_INDEX, docs)
    aux = collect_aux_loss(model).to(logits.device)
    loss = ce + aux if mtp is None else ce + aux + model.config.mtp_lambda * mtp
    return CausalLMOutput(logits=logits, loss=loss, ce_loss=ce, aux_loss=aux, hidden=hidden, mtp_loss=mtp)


def n_predictions(batch: torch.Tensor) -> int:
    """How many predictions a packed batch's cross-entropy averages."""
    return int((batch[:, 1, 1:] != IGNORE_INDEX).sum())
