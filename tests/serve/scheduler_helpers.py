"""Driving a Scheduler without HTTP: collect a request's events, submit, run until idle."""

from __future__ import annotations

import threading

from deepseek_moe.serve.scheduler import Event, FinishEvent, Request, SamplingParams, Scheduler, TokenEvent


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
