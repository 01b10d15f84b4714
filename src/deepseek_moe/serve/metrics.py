"""Serving metrics in the Prometheus text exposition format (version 0.0.4), written out by ``render()``.

A few dozen lines instead of a dependency: counters, gauges and histograms with fixed label sets. Values are
updated from the scheduler's thread and read from the HTTP thread; each update is one Python operation on a
float or a list slot, so a scrape may see a step half counted but never a torn number.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence

import torch

PREFIX = "deepseek_moe"
# Seconds: first tokens (prefill + queueing) span ms to many seconds; per-token gaps are ms to ~1 s.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOAD_WINDOW_S = 10.0  # the expert-load window /stats reports by default
MAX_LOAD_WINDOW_S = 300.0  # how far back snapshots are kept
SNAPSHOT_EVERY_S = 0.1


def _labels(pairs: dict[str, str]) -> str:
    if not pairs:
        return ""
    body = ",".join(f'{k}="{v}"' for k, v in pairs.items())
    return "{" + body + "}"


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Counter:
    kind = "counter"

    def __init__(self, name: str, help: str, labels: dict[str, str] | None = None) -> None:
        self.name, self.help, self.label_pairs = name, help, labels or {}
        self.value = 0.0
        self._children: dict[tuple[tuple[str, str], ...], Counter] = {}

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def labels(self, **pairs: str) -> Counter:
        key = tuple(sorted(pairs.items()))
        if key not in self._children:
            self._children[key] = Counter(self.name, self.help, {**self.label_pairs, **pairs})
        return self._children[key]

    def samples(self) -> list[str]:
        children = list(self._children.values())
        if children:
            return [f"{self.name}{_labels(c.label_pairs)} {_num(c.value)}" for c in children]
        return [f"{self.name}{_labels(self.label_pairs)} {_num(self.value)}"]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float) -> None:
        self.value = float(value)


class Histogram:
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help
        self.bounds = tuple(buckets) + (math.inf,)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def samples(self) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            cumulative += n
            out.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {cumulative}')
        out.append(f"{self.name}_sum {_num(self.sum)}")
        out.append(f"{self.name}_count {cumulative}")
        return out


class ServeMetrics:
    """Everything ``GET /metrics`` shows. ``moe_layer_ids`` and ``n_experts`` size the expert-load table."""

    def __init__(self, moe_layer_ids: Sequence[int], n_experts: int) -> None:
        p = PREFIX
        self.requests_received = Counter(f"{p}_requests_received_total", "Requests accepted into the queue.")
        self.requests_finished = Counter(f"{p}_requests_finished_total",
                                         "Requests finished, by reason (stop, length, cancelled, error, shutdown).")
        self.requests_rejected = Counter(f"{p}_requests_rejected_total",
                                         "Requests refused before queueing, by HTTP status.")
        self.prompt_tokens = Counter(f"{p}_prompt_tokens_total", "Prompt tokens prefilled.")
        self.generation_tokens = Counter(f"{p}_generation_tokens_total", "Tokens generated.")
        self.steps = Counter(f"{p}_scheduler_steps_total", "Scheduler steps run.")
        self.forward_seconds = Counter(f"{p}_forward_seconds_total",
                                       "Wall time inside model forwards (the rest of the time is HTTP, JSON, "
                                       "tokenizing, sampling and waiting).")
        self.forward_cpu_seconds = Counter(f"{p}_forward_cpu_seconds_total",
                                           "CPU time of the scheduler's thread inside model forwards; wall minus "
                                           "this is time the forwards waited (for the GIL, held by the HTTP "
                                           "thread, or for a core).")
        self.forward_tokens = Counter(f"{p}_forward_tokens_total", "Tokens through model forwards.")
        self.queue_depth = Gauge(f"{p}_queue_depth", "Requests waiting for a batch row or cache blocks.")
        self.running = Gauge(f"{p}_running_batch_size", "Sequences in the running batch.")
        self.kv_blocks_used = Gauge(f"{p}_kv_cache_blocks_used", "Cache blocks owned by running sequences.")
        self.kv_blocks_total = Gauge(f"{p}_kv_cache_blocks_total", "Cache blocks in the pool.")
        self.kv_tokens = Gauge(f"{p}_kv_cache_tokens", "Tokens held in the cache by running sequences.")
        self.kv_blocks_cached = Gauge(f"{p}_kv_cache_blocks_cached",
                                      "Cache blocks no sequence holds, kept for their prefix (prefix caching; "
                                      "evicted, least recently used first, when the pool needs them).")
        self.prefix_cache_queries = Counter(f"{p}_prefix_cache_queries_total",
                                            "Prompt tokens of the requests admitted (each request once).")
        self.prefix_cache_hits = Counter(f"{p}_prefix_cache_hits_total",
                                         "Of those, tokens whose latent cache was reused from an earlier request "
                                         "instead of computed.")
        self.spec_verifications = Counter(f"{p}_spec_verifications_total",
                                          "Speculative decoding: drafts verified (one per decoding row that drafted, per step).")
        self.spec_draft_tokens = Counter(f"{p}_spec_draft_tokens_total",
                                         "Speculative decoding: drafted tokens verified.")
        self.spec_accepted_tokens = Counter(f"{p}_spec_accepted_tokens_total",
                                            "Speculative decoding: drafted tokens accepted (each verification also "
                                            "emits one token of its own).")
        self.preemptions = Counter(f"{p}_preemptions_total", "Running requests preempted when the cache ran out "
                                   "(blocks freed, recomputed from their tokens later).")
        self.time_to_first_token = Histogram(f"{p}_time_to_first_token_seconds",
                                             "From arrival to the first generated token.", TTFT_BUCKETS)
        self.time_per_output_token = Histogram(f"{p}_time_per_output_token_seconds",
                                               "Between consecutive generated tokens of a request.", TPOT_BUCKETS)
        self.expert_tokens = Counter(f"{p}_expert_tokens_total",
                                     "Served tokens routed to each routed expert, per MoE layer (top-k picks).")
        self.layer_ids = list(moe_layer_ids)
        self.n_experts = n_experts
        self._load = {layer: [0] * n_experts for layer in self.layer_ids}
        # (time, expert_load()) snapshots for the sliding window, oldest first; the first is the all-zero start.
        self._snapshots: deque[tuple[float, dict[int, list[int]]]] = deque([(time.monotonic(), self.expert_load())])
        self._snapshot_lock = threading.Lock()

    def add_expert_load(self, layer_id: int, tokens_per_expert: torch.Tensor) -> None:
        row = self._load[layer_id]
        for e, n in enumerate(tokens_per_expert.tolist()):
            row[e] += int(n)

    def expert_load(self) -> dict[int, list[int]]:
        return {layer: list(row) for layer, row in self._load.items()}

    def snapshot_expert_load(self, now: float | None = None) -> None:
        """Remember the cumulative expert load at ``now`` (at most every SNAPSHOT_EVERY_S; the scheduler calls it
        after each step, readers of the window before reading), dropping snapshots no window needs."""
        now = time.monotonic() if now is None else now
        with self._snapshot_lock:
            if now - self._snapshots[-1][0] < SNAPSHOT_EVERY_S:
                return
            self._snapshots.append((now, self.expert_load()))
            while len(self._snapshots) > 1 and self._snapshots[1][0] <= now - MAX_LOAD_WINDOW_S:
                self._snapshots.popleft()

    def expert_load_window(self, seconds: float = LOAD_WINDOW_S, now: float | None = None
                           ) -> tuple[dict[int, list[int]], float]:
        """Tokens routed to each expert of each MoE layer since the latest snapshot at least ``seconds`` old (the
        oldest kept if none is that old), and how many seconds that covers: a sliding window, exact to
        SNAPSHOT_EVERY_S or to the gap between the snapshots around its start when the server was idle."""
        now = time.monotonic() if now is None else now
        self.snapshot_expert_load(now)
        current = self.expert_load()
        with self._snapshot_lock:
            start, base = self._snapshots[0]
            for t, load in self._snapshots:
                if t > now - seconds:
                    break
                start, base = t, load
        window = {layer: [n - b for n, b in zip(row, base[layer], strict=True)] for layer, row in current.items()}
        return window, now - start

    @property
    def kv_occupancy(self) -> float:
        total = self.kv_blocks_total.value
        return self.kv_blocks_used.value / total if total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        queries = self.prefix_cache_queries.value
        return self.prefix_cache_hits.value / queries if queries else 0.0

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests_received, self.requests_finished, self.requests_rejected, self.prompt_tokens,
                       self.generation_tokens, self.steps, self.forward_seconds, self.forward_cpu_seconds,
                       self.forward_tokens, self.queue_depth, self.running, self.kv_blocks_used,
                       self.kv_blocks_total, self.kv_tokens, self.kv_blocks_cached, self.prefix_cache_queries,
                       self.prefix_cache_hits, self.spec_verifications, self.spec_draft_tokens,
                       self.spec_accepted_tokens, self.preemptions, self.time_to_first_token,
                       self.time_per_output_token):
            lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.kind}"]
            lines += metric.samples()
        name = f"{PREFIX}_kv_cache_occupancy_ratio"
        lines += [f"# HELP {name} Fraction of cache blocks reserved.", f"# TYPE {name} gauge",
                  f"{name} {_num(self.kv_occupancy)}"]
        name = f"{PREFIX}_prefix_cache_hit_rate"
        lines += [f"# HELP {name} Prompt tokens reused from the prefix cache / prompt tokens, since start.",
                  f"# TYPE {name} gauge", f"{name} {_num(self.prefix_cache_hit_rate)}"]
        lines += [f"# HELP {self.expert_tokens.name} {self.expert_tokens.help}",
                  f"# TYPE {self.expert_tokens.name} counter"]
        for layer, row in self._load.items():
            lines += [f'{self.expert_tokens.name}{{layer="{layer}",expert="{e}"}} {n}' for e, n in enumerate(row)]
        return "\n".join(lines) + "\n"
