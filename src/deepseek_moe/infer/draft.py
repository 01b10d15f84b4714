"""Drafters for speculative decoding: cheap guesses of the next few tokens, which the model then verifies in
one forward (infer/speculative.py).

A drafter returns a ``Draft``: the tokens it guesses and the distribution q each was drawn from. A
deterministic drafter (n-gram lookup) leaves q as None, a point mass on its token; the acceptance rule then
accepts token x with probability p(x) and, on rejection, draws from p with x removed, which is exactly the
target distribution p whatever the drafter guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Draft:
    """``tokens`` (k of them, k >= 0); ``q`` (k, V) float: the distribution each token was drawn from, or None
    when the drafter is deterministic (q is a point mass on each token)."""

    tokens: list[int]
    q: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.q is not None and (self.q.dim() != 2 or self.q.shape[0] != len(self.tokens)):
            raise ValueError(f"draft q has shape {tuple(self.q.shape)}, expected ({len(self.tokens)}, vocab)")


class Drafter(Protocol):
    def propose(self, context: Sequence[int], k: int) -> Draft:
        """Up to ``k`` tokens guessed to follow ``context`` (prompt + output so far; fewer, or none, is fine)."""
        ...


@dataclass(frozen=True, kw_only=True)
class NgramDrafter:
    """Prompt lookup decoding (Saxena 2023; transformers' ``prompt_lookup_num_tokens``, vLLM's ``ngram``): find
    the most recent earlier occurrence of the context's last n tokens (n from ``max_n`` down to ``min_n``) and
    propose the tokens that followed it. Costs no model at all; pays off where the output repeats its input
    (code edits, summaries quoting the text, extraction) or itself."""

    max_n: int = 3
    min_n: int = 1

    def __post_init__(self) -> None:
        if self.min_n < 1:
            raise ValueError(f"min_n ({self.min_n}) must be >= 1")
        if self.max_n < self.min_n:
            raise ValueError(f"max_n ({self.max_n}) must be >= min_n ({self.min_n})")

    def propose(self, context: Sequence[int], k: int) -> Draft:
        L = len(context)
        if k <= 0:
            return Draft([])
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            pattern = list(context[L - n:])
            # Latest start j < L - n whose n tokens equal the pattern; the tokens after it are the draft.
            for j in range(L - n - 1, -1, -1):
                if context[j] == pattern[0] and list(context[j:j + n]) == pattern:
                    return Draft(list(context[j + n:j + n + k]))
        return Draft([])


__all__ = ["Draft", "Drafter", "NgramDrafter"]
