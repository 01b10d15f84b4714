"""What the scheduler is asked and what it answers: a request's sampling parameters, the events its sink receives
(a TokenEvent per token, then exactly one FinishEvent), and the errors ``submit`` and a step can raise."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from deepseek_moe.infer.draft import Draft
from deepseek_moe.infer.speculative import SpecStats
from deepseek_moe.model.kv_cache import BlockTable

if TYPE_CHECKING:
    from deepseek_moe.serve.structured import Constraint


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """temperature 0 is greedy; top_k None and top_p 1.0 disable them; generation stops after ``max_tokens``, at
    a token in ``stop_token_ids`` (unless ``ignore_eos``) or at the most tokens one request can hold (the
    context, or the whole cache if smaller; the only limit when ``max_tokens`` is None). ``logprobs``: None, or
    how many of the most likely alternatives (0 to MAX_LOGPROBS) each TokenEvent carries beside the chosen
    token's log-probability (serve/logprobs.py says which distribution). ``prompt_logprobs``: None, or how many
    alternatives each prompt token's log-probability comes with (OpenAI's ``echo`` with ``logprobs``): filled in
    ``Request.prompt_logprobs`` before the first event. ``max_tokens`` 0 ends the request once its prompt is
    computed, without a token (to score a prompt)."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} ({k}) must be None or in [0, {MAX_LOGPROBS}]")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be None or >= 0")


MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs (and vLLM's default max_logprobs)
MAX_N = 16  # the most choices one request may ask for (``n``); each takes a batch row


@dataclass(frozen=True)
class TokenEvent:
    """A generated token; with ``SamplingParams.logprobs`` set, its log-probability and the most likely
    (token, log-probability) alternatives, most likely first."""

    token: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class FinishEvent:
    """reason: "stop" (a stop token), "length" (max_tokens or the context), "cancelled", "invalid" (the request
    cannot be served as asked: ``param`` names the field; an HTTP 400), "error" (it failed while being served;
    a 500), "shutdown"."""

    reason: str
    error: str | None = None
    param: str | None = None


Event = TokenEvent | FinishEvent


class QueueFullError(RuntimeError):
    """``submit`` refused: ``max_queue`` requests are already waiting."""


class SchedulerStoppedError(RuntimeError):
    """``submit`` refused: the scheduler is shutting down."""


class SchedulerInvariantError(RuntimeError):
    """The scheduler's block ownership is inconsistent: a bug in the scheduler, not any request's fault."""


class InvalidRequestError(ValueError):
    """A request's parameter cannot be served (``param`` names it); ends that request with "invalid"."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(eq=False)
class Request:
    """A prompt and how to continue it. ``sink`` receives the request's events, from the scheduler's thread:
    a TokenEvent per token, then exactly one FinishEvent. ``constraint``: the grammar its output must follow
    (structured output), or None."""

    prompt: Sequence[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    constraint: Constraint | None = None
    id: int = field(default_factory=itertools.count().__next__)
    arrival: float = field(default_factory=time.perf_counter)
    # Filled in by the scheduler.
    output: list[int] = field(default_factory=list)
    table: BlockTable = field(default_factory=BlockTable)
    n_prefilled: int = 0  # prompt tokens counted in the metrics (a recomputation does not count them again)
    adapter: str | None = None  # the LoRA adapter it runs with (None: the base model)
    admitted: bool = False  # once admitted, a preempted request's prompt is not counted again
    block_keys: list[bytes] = field(default_factory=list)  # content keys of its full blocks (prefix caching)
    generator: torch.Generator | None = None
    # With params.prompt_logprobs: entry k is prompt token k + 1's (its log-probability given the tokens before it,
    # its top alternatives); the first prompt token has none. Complete before the request's first event.
    prompt_logprobs: list[tuple[float, tuple[tuple[int, float], ...]]] = field(default_factory=list)
    # n > 1: the request's other choices, held until its prompt is cached and then forked from it (``submit``).
    forks: list[Request] = field(default_factory=list)
    draft: Draft = field(default_factory=lambda: Draft([]))  # speculative decoding: this step's drafted tokens
    speculative: SpecStats = field(default_factory=SpecStats)  # its counts (drafted, accepted) so far
    # speculative="mtp": (index, (D, dim)) the hidden states h^0 .. h^{D-1} at that cached index, which the MTP
    # depths take at the next one (serve/mtp_drafting.py).
    mtp_last: tuple[int, torch.Tensor] | None = None
    # ... and (start, (c, dim)) the main hidden states of its cached slots from start on that a verification kept,
    # which the MTP depths take with its next drafting.
    mtp_pending: tuple[int, torch.Tensor] | None = None
    first_token_time: float = 0.0
    last_token_time: float = 0.0
    finished: bool = False

    @property
    def n_tokens(self) -> int:
        """Prompt and output so far."""
        return len(self.prompt) + len(self.output)

    @property
    def n_pending(self) -> int:
        """Tokens not yet in the cache: the last output token when decoding; more in a prompt or a recompute."""
        return self.n_tokens - self.table.length

    @property
    def in_prefill(self) -> bool:
        """Not decoding, which feeds the last output token alone: a prompt, or a recompute, is still pending."""
        return not self.output or self.n_pending > 1

    def tokens(self, start: int, n: int) -> list[int]:
        """``n`` tokens of prompt + output from position ``start``."""
        p = len(self.prompt)
        head = list(self.prompt[start:start + n]) if start < p else []
        return head + self.output[max(start - p, 0):max(start + n - p, 0)]
