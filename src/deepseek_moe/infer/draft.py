"""Drafters for speculative decoding: cheap guesses of the next few tokens, which the model then verifies in
one forward (infer/speculative.py).

A drafter returns a ``Draft``: the tokens it guesses and the distribution q each was drawn from. A
deterministic drafter (n-gram lookup) leaves q as None, a point mass on its token; the acceptance rule then
accepts token x with probability p(x) and, on rejection, draws from p with x removed, which is exactly the
target distribution p whatever the drafter guessed.

A ``Drafter`` sees only the tokens. A drafter that reads the model's hidden states (the MTP drafter,
infer/mtp_draft.py) keeps state between steps and drafts for the whole batch at once: it is a ``BatchDrafter``,
told the prefill's and every verification's hidden states. ``as_batch_drafter`` gives a ``Drafter`` that
interface, so the decoding loop speaks to one kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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
class SamplingParams:
    """The transform the target's p is taken with (``infer.sampling.probabilities``); a drafter that samples
    draws from the same transform of its own logits, so that its q is comparable (temperature 0: argmax)."""

    temperature: float
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None


@runtime_checkable
class BatchDrafter(Protocol):
    """A stateful drafter over a batch of rows (fixed for one generation). Rows are those of the loop's
    left-padded batch; ``hidden`` is the main model's last hidden state after its final norm (what its head reads,
    ``CausalLMOutput.hidden``)."""

    def begin(self, hidden: torch.Tensor, mask: torch.Tensor, sampling: SamplingParams) -> None:
        """A new generation: the prefill's ``hidden`` (B, T, dim) and its attention ``mask`` (B, T).

        A drafter may also define ``fill_prompts(prompts, num_draft_tokens)`` (optional, looked up by name so
        that drafters written without it keep working): ``generate`` calls it after ``begin`` with each row's
        prompt tokens, unpadded, so that the drafter's own work on the prompt is done and timed as prefill
        rather than in the first draft (``MTPDrafter`` runs its modules over the prompt there)."""
        ...

    def propose_batch(self, contexts: Sequence[Sequence[int]], ks: Sequence[int]) -> list[Draft]:
        """Per row, up to ``ks[i]`` tokens guessed to follow ``contexts[i]`` (0: that row drafts nothing)."""
        ...

    def observe(self, hidden: torch.Tensor, kept: torch.Tensor) -> None:
        """After a verification forward: its ``hidden`` (B, T, dim) and ``kept`` (B, T) bool, the slots the main
        cache keeps (the row's fed token and its accepted drafts; False for padding and rejected drafts)."""
        ...


@dataclass(frozen=True)
class _PerRow:
    """A context-only ``Drafter`` as a ``BatchDrafter``: one ``propose`` per row, hidden states unused."""

    drafter: Drafter

    def begin(self, hidden: torch.Tensor, mask: torch.Tensor, sampling: SamplingParams) -> None:
        pass

    def propose_batch(self, contexts: Sequence[Sequence[int]], ks: Sequence[int]) -> list[Draft]:
        return [Draft([]) if k <= 0 else self.drafter.propose(c, k) for c, k in zip(contexts, ks, strict=True)]

    def observe(self, hidden: torch.Tensor, kept: torch.Tensor) -> None:
        pass


def as_batch_drafter(drafter: Drafter | BatchDrafter) -> BatchDrafter:
    return drafter if isinstance(drafter, BatchDrafter) else _PerRow(drafter)


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


__all__ = ["BatchDrafter", "Draft", "Drafter", "NgramDrafter", "SamplingParams", "as_batch_drafter"]
