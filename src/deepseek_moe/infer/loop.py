"""The decoding loop, apart from what runs the model: :func:`deepseek_moe.generate` (PyTorch) and
:class:`deepseek_moe.export.OnnxLM` (ONNX Runtime, numpy) both left-pad a batch and step it here.

Plain Python on lists: the caller's ``choose`` turns its logits into one token per row and its ``step`` feeds
those tokens to its model, so the rules (left padding, per-row room, stop tokens, streaming, finished rows kept
in the batch) are written once for both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

Logits = TypeVar("Logits")


def check_prompts(prompts: Sequence[Sequence[int]], *, max_seq_len: int, max_new_tokens: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    for i, p in enumerate(prompts):
        if len(p) > max_seq_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than the model's max_seq_len ({max_seq_len})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 0")


def left_padded(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and attention mask (1 real, 0 padding), (B, T) as lists: every row's last prompt token in the
    last column, so each decode step feeds one token per row."""
    T = max(len(p) for p in prompts)
    ids = [[pad_token_id] * (T - len(p)) + list(p) for p in prompts]
    mask = [[0] * (T - len(p)) + [1] * len(p) for p in prompts]
    return ids, mask


def decode(first: Logits, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, max_seq_len: int,
           choose: Callable[[Logits], list[int]], step: Callable[[list[int], list[bool]], Logits],
           stop_tokens: Sequence[int] = (), stream: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Each row's new tokens, from ``first`` (the prefill's logits of every row's last token) on.

    ``choose(logits)`` picks a token per row; ``step(tokens, done)`` feeds them (one per row) and returns the
    next logits. Finished rows keep stepping, so shapes stay batched, but ``done[i]`` tells ``step`` to mask them
    and their tokens are discarded. A row stops after a token in ``stop_tokens``, after ``max_new_tokens``, or
    when it reaches ``max_seq_len`` tokens (room is per row, so batching changes nothing); ``stream(row, token)``
    is called as each token is chosen.
    """
    limits = [min(max_new_tokens, max_seq_len - len(p)) for p in prompts]
    new_tokens: list[list[int]] = [[] for _ in prompts]
    done = [limit <= 0 for limit in limits]
    stops = set(stop_tokens)
    logits = first
    while not all(done):
        tokens = choose(logits)
        for i, token in enumerate(tokens):
            if done[i]:
                continue
            new_tokens[i].append(token)
            if stream is not None:
                stream(i, token)
            done[i] = token in stops or len(new_tokens[i]) >= limits[i]
        if all(done):
            break
        logits = step(tokens, done)
    return new_tokens


__all__ = ["check_prompts", "decode", "left_padded"]
