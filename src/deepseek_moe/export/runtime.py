"""Generation with ONNX Runtime alone (numpy, no torch in the loop): prefill once, then one decode step per token, the
latent cache passed from each step's outputs to the next step's inputs.

A batch of prompts is left-padded, as :func:`deepseek_moe.generate` does; the mask keeps padding out of
attention and out of the positions, so a row's tokens do not depend on its neighbours.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepseek_moe.export.errors import ExportError
from deepseek_moe.infer.loop import check_prompts, decode, left_padded


class OnnxLM:
    """The prefill and decode graphs of an export directory (see :mod:`deepseek_moe.export.lm`) in ONNX
    Runtime sessions. ``int8`` picks the quantised pair; ``threads`` sets intra-op threads (default: ORT's)."""

    def __init__(self, directory: str | os.PathLike[str], *, int8: bool = False, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.directory = Path(directory)
        manifest_file = self.directory / "export.json"
        if not manifest_file.is_file():
            raise ExportError(f"{self.directory}: no export.json (not a directory written by "
                              "`deepseek-moe export onnx`)")
        self.manifest: dict[str, Any] = json.loads(manifest_file.read_text())
        files = self.manifest["files"]
        keys = ("prefill_int8", "decode_int8") if int8 else ("prefill", "decode")
        missing = [k for k in keys if k not in files]
        if missing:
            raise ExportError(f"{self.directory}: no {' or '.join(missing)} graph (export with --int8)")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.prefill = ort.InferenceSession(str(self.directory / files[keys[0]]), options, providers=providers)
        self.decode = ort.InferenceSession(str(self.directory / files[keys[1]]), options, providers=providers)
        self.present_names = [o.name for o in self.prefill.get_outputs()[1:]]
        self.max_seq_len: int = self.manifest["max_seq_len"]
        self.eos_token_id: int | None = self.manifest.get("eos_token_id")
        self.tokenizer: Any = None
        if "tokenizer" in files:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(self.directory / files["tokenizer"]))

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             past: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call: prefill when ``past`` is None, else decode. Returns logits (B, T, V) and the
        presents (the next step's past). ``attention_mask`` covers the new tokens (prefill) or all slots (decode)."""
        feed: dict[str, np.ndarray] = {"input_ids": input_ids.astype(np.int64),
                                       "attention_mask": attention_mask.astype(np.int64)}
        session = self.prefill
        if past is not None:
            session = self.decode
            feed.update({name.replace("present.", "past.", 1): t for name, t in zip(self.present_names, past,
                                                                                      strict=True)})
        logits, *present = session.run(None, feed)
        return logits, present

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, stop_tokens: Sequence[int] = (), pad_token_id: int = 0,
                 stream: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """New tokens for each prompt (greedy at temperature 0, else sampled from softmax(logits / T)); the loop
        is :func:`deepseek_moe.generate`'s (infer/loop.py)."""
        check_prompts(prompts, max_seq_len=self.max_seq_len, max_new_tokens=max_new_tokens)
        rng = np.random.default_rng(seed)
        padded_ids, padded_mask = left_padded(prompts, pad_token_id)
        mask = np.array(padded_mask, dtype=np.int64)
        logits, past = self.step(np.array(padded_ids, dtype=np.int64), mask, None)

        def step(tokens: list[int], done: list[bool]) -> np.ndarray:
            nonlocal mask, past
            mask = np.concatenate((mask, np.array([[0 if d else 1] for d in done], dtype=np.int64)), axis=1)
            logits, past = self.step(np.array(tokens, dtype=np.int64)[:, None], mask, past)
            return logits

        return decode(logits, prompts, max_new_tokens=max_new_tokens, max_seq_len=self.max_seq_len,
                      choose=lambda logits: self._choose(logits[:, -1], temperature, rng).tolist(), step=step,
                      stop_tokens=stop_tokens, stream=stream)

    @staticmethod
    def _choose(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
        if temperature <= 0:
            return logits.argmax(axis=-1)
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        return np.array([rng.choice(len(row), p=row) for row in p], dtype=np.int64)

    def generate_text(self, prompt: str, *, max_new_tokens: int, temperature: float = 0.0,
                      seed: int | None = None) -> str:
        """Continue ``prompt`` with the tokenizer exported beside the graphs."""
        if self.tokenizer is None:
            raise ExportError(f"{self.directory}: no tokenizer.json beside the graphs")
        ids = self.tokenizer.encode(prompt).ids
        stops = [self.eos_token_id] if self.eos_token_id is not None else []
        new = self.generate([ids], max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            stop_tokens=stops)[0]
        return str(self.tokenizer.decode([t for t in new if t not in stops]))


def generate_onnx(directory: str | os.PathLike[str], prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  int8: bool = False, **kwargs: Any) -> list[list[int]]:
    """One-call ORT generation from an export directory: the new tokens of each prompt."""
    return OnnxLM(directory, int8=int8).generate(prompts, max_new_tokens=max_new_tokens, **kwargs)
