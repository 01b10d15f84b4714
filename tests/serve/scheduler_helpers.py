"""Driving a Scheduler without HTTP: collect a request's events, submit, run until idle."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from torch import nn

from deepseek_moe import generate
from deepseek_moe.serve.scheduler import (
    Event,
    FinishEvent,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    TokenEvent,
)


class Collector:
    """A request's event callback that keeps every event; ``done`` is set on its FinishEvent."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, FinishEvent):
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.events if isinstance(e, TokenEvent)]

    @property
    def finishes(self) -> list[FinishEvent]:
        return [e for e in self.events if isinstance(e, FinishEvent)]

    @property
    def finish(self) -> FinishEvent | None:
        """The request's FinishEvent, which must be its last event."""
        last = self.events[-1] if self.events else None
        return last if isinstance(last, FinishEvent) else None


def submit(s: Scheduler, prompt: list[int], **params: object) -> Collector:
    c = Collector()
    s.submit(Request(prompt, SamplingParams(**params), c))  # type: ignore[arg-type]
    return c


def run_all(s: Scheduler, max_steps: int = 10_000) -> int:
    """Step until the scheduler has no work (check_invariants runs at the end of each step); returns the steps."""
    for steps in range(max_steps):
        if not s.has_work():
            return steps
        s.step()
    raise AssertionError(f"the scheduler did not finish its work in {max_steps} steps")


def assert_busy_batch_matches_alone(model: nn.Module, cfg: SchedulerConfig, prompts: Sequence[list[int]],
                                    n_new: Sequence[int], join_after: int = 3) -> Scheduler:
    """The first ``join_after`` requests submitted, two steps, the rest joining while those decode: every
    request's greedy tokens equal generate() on its prompt alone (the dense cache, B=1), each ends on its length
    and every block returns. Returns the scheduler, for checks of its metrics."""
    alone = [generate(model, [p], max_new_tokens=n).new_tokens[0] for p, n in zip(prompts, n_new, strict=True)]
    s = Scheduler(model, cfg)
    pairs = list(zip(prompts, n_new, strict=True))
    out = [submit(s, p, max_tokens=n) for p, n in pairs[:join_after]]
    s.step()
    s.step()
    out += [submit(s, p, max_tokens=n) for p, n in pairs[join_after:]]  # join mid-flight
    run_all(s)
    for i, (c, want) in enumerate(zip(out, alone, strict=True)):
        assert c.tokens == want, f"request {i}"
        assert c.finish == FinishEvent("length")
    assert s.pool.free_blocks == s.pool.capacity_blocks  # every block returned (cached ones count as free)
    return s
