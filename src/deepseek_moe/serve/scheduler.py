"""Continuous batching: which sequences run at each step, and what the paged latent cache holds for them.

Pure Python + torch, no HTTP: ``submit`` a ``Request``, then call ``step()`` (tests do) or ``start()`` a thread
that steps while there is work. Each step

1. retires cancelled requests (a client that went away) and frees their blocks;
2. admits waiting requests in arrival order while the batch has a free row and the block pool can hold the
   request's tokens so far (its prompt; after a preemption, its prompt and output) with a block to spare for
   each running sequence; a request that does not fit waits (later ones do not overtake it), and beyond
   ``max_queue`` waiting requests ``submit`` refuses;
3. plans the step oldest request first: one token for every sequence past its prompt, then for the sequences
   still in their prompts a chunk each, sized to what is left of ``max_batch_tokens`` (chunked prefill: a long
   prompt cannot stall the decoders for more than one step's budget). Blocks are allocated here, as sequences
   grow (``max_tokens`` is never reserved up front, and may be None: up to the context). When the pool runs
   out, the newest running request is preempted: its blocks are freed and it goes back to the head of the
   queue, to be recomputed from its tokens (prompt + output so far) when it is admitted again, as vLLM does;
   its output is what it would have been (greedy and seeded sampling alike: its generator is kept);
4. runs one decode forward for the decoding rows ((B, 1), or (B, 1 + drafted) with speculative decoding) and one for the prefill chunks (right-aligned in a
   (B, longest chunk) batch), each split by ``plan_gathers`` into rows of similar length so that what a step
   gathers from the cache stays within ``GATHER_BOUND`` x ``kv_cache_bytes`` (see ``model/kv_cache.py``);
5. samples each row with its own parameters and generator (structured-output rows first masked to what their
   grammars allow, in one batched operation: ``structured.constrain``), emits the tokens (with the rows that
   asked for ``logprobs`` given theirs from the unmasked logits, in one batched log-softmax and top-k:
   ``serve/logprobs.py``), and retires finished sequences.

Prefix caching (``prefix_cache``, on by default): each full block of final tokens is registered in the pool under
a content key, the hash of its tokens chained with the key of the block before (``chain_block_hashes``, salted
with the request's adapter, so different adapters never share blocks). A request takes the cached blocks of the
longest prefix of its tokens when it is admitted, and again before each prefill chunk while it is block-aligned
(so requests admitted together with the one computing a shared prompt pick it up a chunk later), always leaving
its last token to compute, for its logits. Shared blocks are reference-counted and never written (a table writes
past its length, and only whole blocks are shared); a released block with a key stays cached in an LRU and is
evicted only when the pool needs a block. A preempted request is released like a finished one, so its
recomputation mostly finds its own blocks again. Cached latents are those the same tokens would produce, so
outputs are those without the cache (within float rounding, as for batching).

Speculative decoding (``speculative``, off by default): each decoding row feeds its last token and up to
``num_draft_tokens`` drafted ones (infer/draft.py), drawn from the step's token budget and given blocks only if
the pool has them free beyond a block for each running row's next token (so a draft rarely pushes another
row into preemption); the row's logits at those positions verify the draft by
speculative rejection sampling (infer/speculative.py), which emits 1 to k + 1 tokens distributed as plain
sampling's, and the table is truncated past the accepted ones (``BlockPool.truncate``; only blocks of final
tokens are ever registered for sharing, so a cut never falls in a shared block). Greedy output is plain greedy's.
The drafter is prompt lookup ("ngram", drawn while planning: serve/drafting.py) or the model's MTP modules
("mtp", drawn for all decoding rows once the step is planned: serve/mtp_drafting.py). MTP keeps each depth's keys
and values as one more layer of the same pool, at the index of the token the entry reads, so truncation, forks,
preemption and freeing carry them with the latents. Every forward's kept slots go through the MTP depths before
their blocks are registered (a verification's with the row's next drafting, in the same forwards), so a block the
prefix cache shares holds final MTP entries too; the hidden states its last slot hands on are stashed per block, and a request
that takes cached blocks drafts exactly as if it had computed them.

Decode and prefill are separate forwards so that decode rows are never padded to a prefill chunk's width. The
padding of a prefill batch is routed to no expert (the model passes the attention mask down to the MoE layers as
a token mask), so the served expert-load statistics count real tokens only.

Whatever can fail for one request fails that request alone and returns its blocks: setting it up at admission
(its generator: a seed no generator takes is answered "invalid"), a forward (a batched forward that raises is
retried row by row, so only the row that raises fails), sampling, its sink. After every step
``check_invariants`` verifies the block ownership (every block is free or owned by exactly one request in
flight); a broken invariant, or any other exception out of a step, is a scheduler bug: the thread then fails the
running requests, frees every block and goes on serving the queue (``_recover``). Every submitted request gets
exactly one FinishEvent, shutdown included.

Greedy results do not depend on the batch: each row's attention sees only its own slots and routing is per
token. The logits agree with a request run alone within float rounding (about 1e-6 in float32: matrix products of
a different batch shape sum in a different order), so the greedy tokens are equal unless two candidates tie that
closely. The same holds for a preempted request's recomputation (one prefill instead of token-by-token decode).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from deepseek_moe.infer.draft import Draft, NgramDrafter
from deepseek_moe.infer.sampling import sample
from deepseek_moe.infer.speculative import accept
from deepseek_moe.model.kv_cache import BlockPool, chain_block_hashes, plan_gathers
from deepseek_moe.moe.layer import MoE
from deepseek_moe.serve.drafting import draft_room, ngram_draft, reserve_draft
from deepseek_moe.serve.logprobs import TokenLogprobs, token_logprobs
from deepseek_moe.serve.metrics import ServeMetrics
from deepseek_moe.serve.mtp_drafting import PagedMTP, check_mtp

# The request types live in request.py; callers import them from here, hence the explicit re-exports.
from deepseek_moe.serve.request import Event as Event
from deepseek_moe.serve.request import (
    FinishEvent,
    InvalidRequestError,
    QueueFullError,
    Request,
    SchedulerInvariantError,
    SchedulerStoppedError,
    TokenEvent,
)
from deepseek_moe.serve.request import SamplingParams as SamplingParams
from deepseek_moe.serve.structured import FormatError, constrain

if TYPE_CHECKING:
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """max_batch_size: sequences per step; max_batch_tokens: tokens per step, prefill included (>= batch size,
    so a prefilling sequence always gets a share); kv_cache_bytes: the block pool's size; block_size: slots per
    block; max_queue: waiting requests beyond which ``submit`` refuses; prefix_cache: share the cache blocks of
    common prefixes between requests (see the module's docstring); speculative: the drafter of speculative
    decoding ("ngram": prompt lookup; "mtp": the model's multi-token-prediction modules, for a model with
    mtp_depth >= 1; None: off), num_draft_tokens: the most it drafts per row and step."""

    max_batch_size: int = 32
    max_batch_tokens: int = 512
    kv_cache_bytes: int = 1 << 30
    block_size: int = 16
    max_queue: int = 256
    prefix_cache: bool = True
    speculative: Literal["ngram", "mtp"] | None = None
    num_draft_tokens: int = 4

    def __post_init__(self) -> None:
        if self.speculative not in (None, "ngram", "mtp"):
            raise ValueError(f"speculative ({self.speculative!r}) must be 'ngram', 'mtp' or None")
        for name in ("max_batch_size", "max_batch_tokens", "kv_cache_bytes", "block_size", "num_draft_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.max_queue < 0:
            raise ValueError(f"max_queue ({self.max_queue}) must be >= 0")
        if self.max_batch_tokens < self.max_batch_size:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must be >= max_batch_size "
                             f"({self.max_batch_size}): every running sequence needs a token per step")


class Scheduler:
    def __init__(self, model: DeepSeekMoEForCausalLM, config: SchedulerConfig | None = None, *,
                 metrics: ServeMetrics | None = None, adapters: Mapping[str, nn.Module] | None = None) -> None:
        """``adapters``: name -> the model with that LoRA adapter, sharing ``model``'s weights
        (``serve.adapters.load_adapters``); a request runs with the one its ``adapter`` names (None: ``model``)."""
        from deepseek_moe.model.counting import kv_cache_bytes_per_token

        self.model = model.eval()
        self.config = config = config or SchedulerConfig()
        self.device = model.embed.weight.device
        self.max_seq_len = model.config.max_seq_len
        dtype = model.embed.weight.dtype
        # With MTP drafting each depth is one more layer of the pool (serve/mtp_drafting.py), as large as a main one.
        n_layers = len(model.layers) + (check_mtp(model) if config.speculative == "mtp" else 0)
        self.bytes_per_token = kv_cache_bytes_per_token(model.config, dtype) // len(model.layers) * n_layers
        n_blocks = config.kv_cache_bytes // (self.bytes_per_token * config.block_size)
        if n_blocks < 2:
            raise ValueError(f"kv_cache_bytes ({config.kv_cache_bytes}) holds {n_blocks} blocks of "
                             f"{config.block_size} tokens at {self.bytes_per_token} bytes per token; need >= 2")
        self.pool = BlockPool(n_layers, n_blocks, config.block_size, prefix_cache=config.prefix_cache)
        # Found by type, not through a model method, so any model holding our MoE layers is served.
        # model.layers only: an MTP module's MoE block never runs here and would show as an empty row.
        self.moe = [m for m in model.layers.modules() if isinstance(m, MoE)]
        self.models: dict[str | None, nn.Module] = {None: self.model, **{k: m.eval() for k, m in (adapters or {}).items()}}
        self._moe_of = {k: [m for m in mod.get_submodule("layers").modules() if isinstance(m, MoE)]
                        for k, mod in self.models.items()}
        self.drafter = NgramDrafter() if config.speculative == "ngram" else None
        self.mtp = PagedMTP(model, self.pool, self.models) if config.speculative == "mtp" else None
        self._mtp_ks: dict[int, int] = {}  # request id -> the tokens it drafts this step (planned, not yet drawn)
        self._verified_hidden: dict[int, torch.Tensor] = {}  # request id -> its verification's hidden states
        self.metrics = metrics or ServeMetrics([m.layer_id for m in self.moe], model.config.moe.n_routed_experts)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._live: dict[int, Request] = {}  # submitted, not yet finished: each gets exactly one FinishEvent
        self._cancelled: dict[int, str] = {}  # request id -> the reason it finishes with
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._thread_exit = False
        self._shutdown_lock = threading.Lock()
        self.step_count = 0
        self.preemptions = 0

    # --- the thread-safe surface ------------------------------------------------------------------------------

    def max_tokens_capacity(self) -> int:
        """The most tokens (prompt + output) one request can ever hold in this pool."""
        return min(self.max_seq_len, self.pool.capacity_blocks * self.pool.block_size)

    @property
    def adapter_names(self) -> list[str]:
        return [k for k in self.models if k is not None]

    def submit(self, request: Request, forks: Sequence[Request] = ()) -> Request:
        """Queue ``request``; ``forks``: its other choices (``n`` > 1), requests of the same prompt and adapter
        with their own parameters (seed), sinks and constraints. They are not queued: once ``request``'s prompt is
        cached they are forked from it (``BlockPool.fork``: its blocks shared, not computed again) and sample their
        first tokens from its last logits. A request and its forks take ``1 + len(forks)`` batch rows."""
        if not request.prompt:
            raise ValueError("prompt is empty: it needs at least one token")
        if 1 + len(forks) > self.config.max_batch_size:
            raise ValueError(f"{1 + len(forks)} choices (n) exceed max_batch_size ({self.config.max_batch_size}): "
                             "each choice takes a batch row")
        for child in forks:
            if list(child.prompt) != list(request.prompt) or child.adapter != request.adapter:
                raise ValueError("a fork must have its request's prompt and adapter")
        if request.adapter not in self.models:
            raise ValueError(f"adapter {request.adapter!r} is not loaded (loaded: {self.adapter_names})")
        # A request alone must always fit, or preemption could never make room for it.
        total = len(request.prompt) + (request.params.max_tokens or 1)
        if total > self.max_tokens_capacity():
            raise ValueError(f"prompt ({len(request.prompt)} tokens) + max_tokens ({request.params.max_tokens}) "
                             f"exceeds what one request can hold ({self.max_tokens_capacity()} tokens)")
        with self._lock:
            if self._stopping:
                raise SchedulerStoppedError("the server is shutting down")
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFullError(f"{len(self.waiting)} requests are waiting (max_queue "
                                     f"{self.config.max_queue})")
            request.forks = list(forks)
            self.waiting.append(request)
            for r in (request, *forks):
                self._live[r.id] = r
                self.metrics.requests_received.inc()
            self._wake.notify()
        return request

    def cancel(self, request_id: int, reason: str = "cancelled") -> None:
        """Retire the request at the next step: its client went away ("cancelled"), or the app saw a stop string
        ("stop", so /metrics counts it as stopped, not cancelled)."""
        with self._lock:
            self._cancelled.setdefault(request_id, reason)
            self._wake.notify()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="deepseek-moe-scheduler", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new requests, let those admitted or waiting finish for up to ``timeout`` seconds, then end the
        rest with a "shutdown" FinishEvent and stop the thread."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        with self._shutdown_lock:  # a second caller waits for the first, then finds nothing left
            self._drain(timeout)

    def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            while self._thread.is_alive() and self.has_work() and time.monotonic() < deadline:
                time.sleep(0.01)
            with self._lock:
                self._thread_exit = True
                self._wake.notify()
            self._thread.join()
        with self._lock:
            leftovers = list(self._live.values())
            self.waiting.clear()
            self.running = []
        for req in leftovers:
            self.pool.release(req.table)
        for req in leftovers:
            self._finish(req, FinishEvent("shutdown", "the server shut down before this request finished"))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._thread_exit and not (self.waiting or self.running or self._cancelled):
                    self._wake.wait()
                if self._thread_exit:
                    return
            try:
                self.step()
            except Exception as e:  # a bug in the scheduler itself: fail what is in flight, keep serving
                log.exception("scheduler step failed; failing the %d running requests", len(self.running))
                self._recover(e)

    def _recover(self, error: Exception) -> None:
        """After a step raised: fail every request that may own blocks (the running ones, and any caught between
        the queue and the batch), return every block to the pool, and keep the untouched queue."""
        with self._lock:
            queued = set(map(id, self.waiting))
            victims = [r for r in self._live.values() if id(r) not in queued]
            self.running = []
            for req in itertools.chain(victims, self.waiting):
                req.table.clear()
            self.pool.reset()
        for req in victims:
            self._finish(req, FinishEvent("error", f"internal error: {type(error).__name__}: {error}"))

    # --- one step ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Retire cancelled requests, admit waiting ones, run one decode forward and the prefill chunks."""
        self._retire_cancelled()
        self._admit()
        self.step_count += 1
        self.metrics.steps.inc()
        decoding, chunks = self._plan()
        if decoding and self.mtp is not None:
            decoding = self._mtp_draft(decoding)
        if decoding and self.config.speculative is not None:
            self._verify(decoding)
        elif decoding:
            rows = self._run(decoding, [r.tokens(r.table.length, 1) for r in decoding])
            self._emit_rows([(r, x) for r, x in zip(decoding, rows, strict=True) if x is not None])
        if chunks:
            reqs = [r for r, _ in chunks]
            ids = [r.tokens(r.table.length, n) for r, n in chunks]
            done: list[tuple[Request, torch.Tensor]] = []
            for req, logits in zip(reqs, self._run(reqs, ids), strict=True):
                if logits is None:
                    continue
                counted = min(req.table.length, len(req.prompt))
                self.metrics.prompt_tokens.inc(max(counted - req.n_prefilled, 0))
                req.n_prefilled = max(req.n_prefilled, counted)
                if req.n_pending == 0 and req.params.max_tokens == 0:  # only its prompt was wanted (echo)
                    for child in req.forks:
                        child.prompt_logprobs = list(req.prompt_logprobs)
                    self._drop(req)
                    self._finish(req, FinishEvent("length"))
                    continue
                if req.n_pending == 0:  # the chunk reached the last token: its logits choose the next one
                    done.append((req, logits))
                    if req.forks:  # n > 1: the other choices sample from the same logits
                        done.extend((child, logits) for child in self._spawn(req))
            self._emit_rows(done)
        self._update_gauges()
        self.check_invariants()

    def _verify(self, decoding: list[Request]) -> None:
        """Speculative decoding: one forward over each row's last token and draft; a row that drafted emits what
        speculative rejection sampling accepts, and its table forgets the rejected drafted slots; a row that did
        not is an ordinary decoding row (``_emit_rows``). With MTP drafting the hidden states of the kept slots
        wait on the request (``mtp_pending``) for its next drafting, which puts them through the MTP depths."""
        ids = [r.tokens(r.table.length, 1) + r.draft.tokens for r in decoding]
        self._verified_hidden = {}
        rows = self._run(decoding, ids, last=max(len(x) for x in ids), verify=True)
        plain: list[tuple[Request, torch.Tensor]] = []
        verified: list[tuple[Request, list[int], list[TokenLogprobs] | None, int]] = []
        for req, logits in zip(decoding, rows, strict=True):
            draft, req.draft = req.draft, Draft([])
            if logits is None:
                continue
            logits = logits.reshape(-1, logits.shape[-1])  # (V,) when no row drafted: last was 1
            k, p = len(draft.tokens), req.params
            if k == 0:
                plain.append((req, logits[-1]))
                continue
            try:
                tokens = accept(logits[logits.shape[0] - k - 1:], draft, temperature=p.temperature,
                                top_k=p.top_k if p.top_k is not None and p.top_k < logits.shape[-1] else None,
                                top_p=p.top_p if p.top_p < 1.0 else None, generator=req.generator)
                self.pool.truncate(req.table, req.table.length - (k - (len(tokens) - 1)))
            except Exception as e:
                self._fail(req, e)
                continue
            found = None
            if p.logprobs is not None:  # position j's logits chose accepted token j
                try:
                    found = token_logprobs(logits[logits.shape[0] - k - 1:][:len(tokens)], tokens,
                                           [p.logprobs] * len(tokens))
                except Exception as e:
                    self._fail(req, e)
                    continue
            verified.append((req, tokens, found, k))
        if self.mtp is not None:  # the kept slots' hidden states wait for the row's next drafting
            hidden, self._verified_hidden = self._verified_hidden, {}
            for req, kept in [(r, len(t)) for r, t, _, _ in verified] + [(r, 1) for r, _ in plain]:
                if not req.finished and req.id in hidden:
                    req.mtp_pending = (req.table.length - kept, hidden[req.id][:kept])
        for req, tokens, found, k in verified:
            if req.finished:
                continue
            req.speculative.add(k, len(tokens) - 1)
            self.metrics.spec_verifications.inc()
            self.metrics.spec_draft_tokens.inc(k)
            self.metrics.spec_accepted_tokens.inc(len(tokens) - 1)
            self._push(req, tokens, found)
        self._emit_rows(plain)

    def _draft(self, req: Request, budget: int) -> int:
        """How many tokens decoding row ``req`` drafts this step (serve/drafting.py: within the step's ``budget``,
        the request's room and the blocks free now, which it reserves: a draft is worth no preemption). An n-gram
        draft is drawn now (``req.draft``); MTP drafts are drawn for all rows once the step is planned."""
        k = draft_room(req, budget, self.config.num_draft_tokens, self.max_tokens_capacity())
        draft = Draft([])
        if k > 0 and self.drafter is not None:
            draft = ngram_draft(self.drafter, req, k)
            k = len(draft.tokens)
        if k <= 0 or not reserve_draft(self.pool, req, k, len(self.running)):
            return 0
        req.draft = draft
        if self.mtp is not None:
            self._mtp_ks[req.id] = k
        return k

    def _mtp_draft(self, decoding: list[Request]) -> list[Request]:
        """Draw the planned MTP drafts of the decoding rows at once, their last verification's kept slots going
        through the MTP depths first (``PagedMTP.draft``), then register their full blocks for sharing; if that
        raises, row by row, failing only a row that raises on its own. Returns the rows still running."""
        assert self.mtp is not None
        ks = [self._mtp_ks.get(r.id, 0) for r in decoding]
        try:
            drafts = self.mtp.draft(decoding, ks)
        except Exception:
            drafts = []
            for req, k in zip(decoding, ks, strict=True):
                try:
                    drafts += self.mtp.draft([req], [k])
                except Exception as e:
                    self._fail(req, e)
                    drafts.append(Draft([]))
        for req, draft in zip(decoding, drafts, strict=True):
            req.draft = draft
        decoding = [r for r in decoding if not r.finished]
        if self.pool.prefix_cache:  # the last verification's blocks, which waited for their MTP entries
            for req in decoding:
                self.pool.register(req.table, self._block_keys(req, min(req.table.length, req.n_tokens)))
        return decoding

    def check_invariants(self) -> None:
        """Raise SchedulerInvariantError unless every block but the padding block is either free or owned by
        exactly one request in flight, and each request's cached length fits the blocks it owns."""
        with self._lock:
            owners = [(r.id, r.table) for r in itertools.chain(self.running, self.waiting)]
        problems = self.pool.audit([t for _, t in owners])
        bs = self.pool.block_size
        problems += [f"request {rid} caches {t.length} tokens in {len(t.blocks)} blocks of {bs}"
                     for rid, t in owners if t.length > len(t.blocks) * bs]
        if problems:
            raise SchedulerInvariantError("block ownership is broken after step "
                                          f"{self.step_count}: {'; '.join(problems)}")

    def _retire_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, {}
            gone = [r for r in itertools.chain(self.waiting, self.running) if r.id in cancelled]
            forks = [(r, c) for r in itertools.chain(self.waiting, self.running) for c in r.forks if c.id in cancelled]
        for parent, child in forks:
            parent.forks.remove(child)
            self._finish(child, FinishEvent(cancelled[child.id]))
        for req in gone:
            self._drop(req)
            self._finish(req, FinishEvent(cancelled[req.id]))

    def _admit(self) -> None:
        while True:
            with self._lock:
                # A request's forks hold their rows from its admission: they join the batch when its prompt is in.
                if not self.waiting or self._n_rows() + 1 + len(self.waiting[0].forks) > self.config.max_batch_size:
                    return
                req = self.waiting[0]
                self._match_prefix(req)
                # A block to spare per running sequence (and per fork, for its copy of a partly filled last block),
                # so that admitting does not preempt at the next step. Into an empty batch a request is admitted
                # whenever its tokens fit: it may hold more forks than the pool has spare blocks for even when
                # empty, and would otherwise wait forever (with the queue behind it); forks that find no block
                # then wait their turn (``_spawn``).
                spare = self.pool.free_blocks - (self.pool.blocks_for(req.n_tokens) - len(req.table.blocks))
                wanted = self._n_rows() + len(req.forks) if self.running else 0
                if spare < wanted or not self.pool.reserve(req.table, req.n_tokens):
                    self.pool.release(req.table)  # the prefix it matched stays cached
                    return  # first come, first served: later requests do not overtake one that waits for room
                if not req.admitted:
                    req.admitted = True
                    self.metrics.prefix_cache_queries.inc(len(req.prompt))
                self._count_reused(req)
                self.waiting.popleft()
                self.running.append(req)  # from here on it owns blocks: a failure below must return them
            try:
                self._setup(req)
            except InvalidRequestError as e:
                self._drop(req)
                self._finish(req, FinishEvent("invalid", str(e), param=e.param))
            except Exception as e:
                self._fail(req, e)

    def _n_rows(self) -> int:
        """Batch rows taken: the running requests and the forks waiting for their prompts."""
        return sum(1 + len(r.forks) for r in self.running)

    def _spawn(self, req: Request) -> list[Request]:
        """``req``'s prompt is cached: fork its choices from it (``BlockPool.fork``) into the batch, to sample
        from its last logits. A fork the pool has no block for (its copy of a partly filled last block) waits at
        the head of the queue instead, to compute its prompt like any request (from the prefix cache, if on)."""
        forks, req.forks = req.forks, []
        spawned = []
        for child in forks:
            if child.finished:
                continue
            # Its prompt is counted once, as req's: not in the prefix-cache queries nor the prompt tokens again.
            child.admitted, child.n_prefilled, child.block_keys = True, req.n_prefilled, list(req.block_keys)
            child.prompt_logprobs = list(req.prompt_logprobs)
            child.mtp_last = req.mtp_last  # its MTP entries are forked with the blocks (serve/mtp_drafting.py)
            if not self.pool.fork(req.table, child.table):
                with self._lock:
                    self.waiting.appendleft(child)
                continue
            self.running.append(child)
            try:
                self._setup(child)
            except InvalidRequestError as e:
                self._drop(child)
                self._finish(child, FinishEvent("invalid", str(e), param=e.param))
                continue
            except Exception as e:
                self._fail(child, e)
                continue
            spawned.append(child)
        return spawned

    def _block_keys(self, req: Request, n_tokens: int) -> list[bytes]:
        """The content keys of the full blocks among ``req``'s first ``n_tokens`` tokens (computed once, extended
        as the request grows), salted with its adapter: another adapter's latents differ for the same tokens."""
        bs = self.pool.block_size
        n = n_tokens // bs
        if len(req.block_keys) < n:
            req.block_keys = chain_block_hashes(req.tokens(0, n * bs), bs, (req.adapter or "").encode(),
                                                req.block_keys)
        return req.block_keys[:n]

    def _match_prefix(self, req: Request) -> None:
        """Take the cached blocks of the longest prefix of ``req``'s tokens that follows what it caches, leaving at
        least its last token to compute (its logits choose the next token)."""
        if req.params.prompt_logprobs is not None and len(req.prompt_logprobs) < len(req.prompt) - 1:
            return  # its prompt's logits are wanted: a cached block would skip them
        if self.pool.prefix_cache and req.table.length % self.pool.block_size == 0:
            self.pool.match(req.table, self._block_keys(req, req.n_tokens - 1))

    def _count_reused(self, req: Request) -> None:
        """Count the prompt tokens a match gave ``req`` that it has not computed (nor been counted for) before."""
        reused = min(req.table.length, len(req.prompt)) - req.n_prefilled
        if reused > 0:
            self.metrics.prefix_cache_hits.inc(reused)
            req.n_prefilled += reused

    def _setup(self, req: Request) -> None:
        """What a request needs before its first forward, made when it first joins the batch (a preempted
        request keeps its generator, so its samples do not change)."""
        seed = req.params.seed
        if seed is not None and req.generator is None:
            generator = torch.Generator(device=self.device)
            try:
                generator.manual_seed(seed)
            except (ValueError, RuntimeError, OverflowError, TypeError) as e:
                raise InvalidRequestError("seed", f"{seed} cannot seed a random generator ({e}); use an integer "
                                          "in [-2**63, 2**64)") from None
            req.generator = generator

    def _plan(self) -> tuple[list[Request], list[tuple[Request, int]]]:
        """This step's decoding rows and prefill chunks (request, tokens), oldest request first, with the blocks
        for their new tokens allocated; preempts the newest running requests when the pool runs out."""
        budget = self.config.max_batch_tokens - sum(not r.in_prefill for r in self.running)
        self._mtp_ks = {}
        decoding: list[Request] = []
        chunks: list[tuple[Request, int]] = []
        i = 0
        while i < len(self.running):
            req = self.running[i]
            if req.in_prefill:  # a request admitted beside the one computing its prefix finds it here
                self._match_prefix(req)
                self._count_reused(req)
            prefill = req.in_prefill
            n = min(req.n_pending, budget) if prefill else 1
            if not prefill and self.config.speculative is not None:
                k = self._draft(req, budget)
                budget -= k
                n += k
            if n > 0:
                n = self._allocate(req, n)
                if n == 0:  # req itself was preempted: it was the newest, nothing is left to plan
                    break
                if prefill:
                    chunks.append((req, n))
                    budget -= n
                else:
                    decoding.append(req)
            i += 1
        return decoding, chunks

    def _allocate(self, req: Request, n: int) -> int:
        """Blocks for ``n`` more tokens of ``req``, preempting the newest running requests (never an older one)
        until they fit. If ``req`` is itself the newest, a prefill chunk shrinks to the room left; otherwise
        ``req`` is preempted. Returns the tokens it may append (0: preempted)."""
        bs = self.pool.block_size
        while not self.pool.reserve(req.table, req.table.length + n):
            victim = self.running[-1]
            if victim is not req:
                self._preempt(victim)
                continue
            room = (len(req.table.blocks) + self.pool.free_blocks) * bs - req.table.length
            if req.in_prefill and room > 0:
                n = min(n, room)
                continue
            self._preempt(req)
            return 0
        return n

    def _preempt(self, req: Request) -> None:
        """Free ``req``'s blocks and put it back at the head of the queue, to be recomputed from its tokens."""
        self.running.remove(req)
        self.pool.release(req.table)
        req.mtp_pending = None  # it is recomputed: the prefill fills its MTP entries
        if not self.running:  # alone and still out of room: submit's check should make this impossible
            self._fail(req, RuntimeError(f"{req.n_tokens} tokens do not fit the whole cache "
                                         f"({self.max_tokens_capacity()} tokens)"))
            return
        self.preemptions += 1
        self.metrics.preemptions.inc()
        with self._lock:
            self.waiting.appendleft(req)

    def _run(self, reqs: list[Request], ids: list[list[int]], last: int = 1, verify: bool = False
             ) -> list[torch.Tensor | None]:
        """Each row's last logits (V,), or its last ``last`` > 1 ((<= last, V): a row's own, right-aligned), from
        one forward per adapter and group of rows of similar length (``plan_gathers``): rows of one adapter run
        together through its model. ``verify``: the rows feed drafts (``_forward``)."""
        out: list[torch.Tensor | None] = [None] * len(reqs)
        by_adapter: dict[str | None, list[int]] = {}
        for i, req in enumerate(reqs):
            by_adapter.setdefault(req.adapter, []).append(i)
        for rows in by_adapter.values():
            for group in plan_gathers([reqs[j].table.length for j in rows], [len(ids[j]) for j in rows]):
                picked = [rows[g] for g in group]
                for j, logits in zip(picked, self._rows([ids[j] for j in picked], [reqs[j] for j in picked], last,
                                                        verify), strict=True):
                    out[j] = logits
        return out

    def _drop(self, req: Request) -> None:
        """Take ``req`` out of the queue or the batch and return its blocks."""
        with self._lock:
            if req in self.waiting:
                self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        self.pool.release(req.table)

    def _forward(self, reqs: list[Request], ids: list[list[int]], last: int = 1, verify: bool = False
                 ) -> torch.Tensor:
        """One forward of ``reqs`` (all of one adapter) appending ``ids`` (one list per row); returns each row's
        last logits (B, V), or its last ``last`` > 1 (B, min(last, T), V). With MTP drafting the new slots go
        through the MTP depths before their blocks are registered; for a verification (``verify``), whose drafted
        slots may be rejected, that waits for the accepted length (``_verify``): the hidden states are kept."""
        adapter = reqs[0].adapter
        n_new = [len(x) for x in ids]
        cache = self.pool.batch([r.table for r in reqs], n_new)
        T = max(n_new)
        input_ids = torch.zeros(len(reqs), T, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, T - len(x):] = torch.tensor(x, dtype=torch.long)
        mask = cache.new_token_mask.to(self.device)
        start, start_cpu = time.perf_counter(), time.thread_time()
        out = self.models[adapter](input_ids.to(self.device), attention_mask=mask, cache=cache)
        logits = out.logits
        for i, req in enumerate(reqs):  # echo: each prompt token's logprobs, from the logits before it
            if req.params.prompt_logprobs is not None and len(req.prompt_logprobs) < len(req.prompt) - 1:
                self._add_prompt_logprobs(req, logits[i, T - n_new[i]:])
        logits = logits[:, -1] if last == 1 else logits[:, -last:]
        if self.mtp is not None:
            hidden = [out.hidden[i, T - n:] for i, n in enumerate(n_new)]
            if verify:
                self._verified_hidden.update((r.id, h) for r, h in zip(reqs, hidden, strict=True))
            else:
                self.mtp.fill(reqs, [r.table.length for r in reqs], hidden, ids)
        cache.commit()
        if self.pool.prefix_cache and not (verify and self.mtp is not None):
            for req in reqs:  # the blocks these tokens filled can now be shared
                self.pool.register(req.table, self._block_keys(req, min(req.table.length, req.n_tokens)))
        self._count_routing(adapter)
        self.metrics.forward_seconds.inc(time.perf_counter() - start)
        self.metrics.forward_cpu_seconds.inc(time.thread_time() - start_cpu)
        self.metrics.forward_tokens.inc(sum(n_new))
        return logits

    def _add_prompt_logprobs(self, req: Request, logits_NV: torch.Tensor) -> None:
        """Extend ``req.prompt_logprobs`` with what this forward's rows give (row j: position ``table.length + j``,
        whose logits predict prompt token ``table.length + j + 1``). Its prompt is computed in order, from the
        first token it lacks, as it takes no cached blocks until the list is complete."""
        start, have = req.table.length, len(req.prompt_logprobs)
        if have < start:
            raise SchedulerInvariantError(f"request {req.id}: prompt logprobs for {have} tokens, but its forward "
                                          f"starts at position {start}")
        positions = range(have, min(start + logits_NV.shape[0], len(req.prompt) - 1))
        if positions:
            k = req.params.prompt_logprobs or 0
            req.prompt_logprobs += token_logprobs(logits_NV[positions.start - start:positions.stop - start],
                                                  [req.prompt[p + 1] for p in positions], [k] * len(positions))

    def _rows(self, ids: list[list[int]], reqs: list[Request], last: int = 1, verify: bool = False
              ) -> list[torch.Tensor | None]:
        """Each row's last logits from one forward. If it raises, the rows run one by one so that only a row that
        raises on its own fails (its entry None); the others still get their token this step."""
        try:
            return list(self._forward(reqs, ids, last, verify))
        except Exception:
            out: list[torch.Tensor | None] = []
            for req, x in zip(reqs, ids, strict=True):
                try:
                    out.append(self._forward([req], [x], last, verify)[0])
                except Exception as e:
                    self._fail(req, e)
                    out.append(None)
            return out

    def _emit_rows(self, rows: list[tuple[Request, torch.Tensor]]) -> None:
        """Choose and emit the next token of each (request, last logits) row. Structured-output rows are masked
        to their grammars' tokens first, all at once; greedy rows (the common case) take one argmax over the
        batch instead of one call per row. Rows that asked for logprobs get them from the unmasked logits, in
        one batched computation (serve/logprobs.py)."""
        if not rows:
            return
        reqs = [r for r, _ in rows]
        logits_BV = torch.stack([x for _, x in rows])
        # logprobs report the unmasked distribution; constrain masks in place, so keep a copy when both meet.
        both = any(r.params.logprobs is not None and r.constraint is not None for r in reqs)
        raw_BV = logits_BV.clone() if both else logits_BV
        try:
            logits_BV = constrain([r.constraint for r in reqs], logits_BV)
        except Exception:  # a grammar failed: find the row it belongs to, and fail that request alone
            masked = []
            for req, logits in rows:
                try:
                    masked.append(constrain([req.constraint], logits[None])[0])
                except Exception as e:
                    self._fail(req, e)
                    masked.append(logits)
            logits_BV = torch.stack(masked)
        chosen: list[tuple[int, int]] = []  # (row, token)
        for i, (req, logits, argmax) in enumerate(zip(reqs, logits_BV, logits_BV.argmax(-1).tolist(), strict=True)):
            if not req.finished:
                token = self._choose(req, logits, argmax)
                if token is not None:
                    chosen.append((i, token))
        asking = [(i, t) for i, t in chosen if reqs[i].params.logprobs is not None]
        found: dict[int, TokenLogprobs] = {}
        if asking:
            try:
                values = token_logprobs(raw_BV[[i for i, _ in asking]], [t for _, t in asking],
                                        [reqs[i].params.logprobs or 0 for i, _ in asking])
                found = {i: v for (i, _), v in zip(asking, values, strict=True)}
            except Exception as e:
                for i, _ in asking:
                    self._fail(reqs[i], e)
        for i, token in chosen:
            if not reqs[i].finished:
                self._push(reqs[i], [token], [found[i]] if i in found else None)

    def _choose(self, req: Request, logits_V: torch.Tensor, argmax: int | None = None) -> int | None:
        """``req``'s next token (``argmax``, when given, is that of ``logits_V``); None when sampling failed
        (the request is failed)."""
        p = req.params
        try:
            top_k = p.top_k if p.top_k is not None and p.top_k < logits_V.shape[-1] else None
            if p.temperature == 0.0 and argmax is not None:
                return argmax
            return int(sample(logits_V[None], temperature=p.temperature, top_k=top_k,
                              top_p=p.top_p if p.top_p < 1.0 else None, generator=req.generator)[0])
        except Exception as e:
            self._fail(req, e)
            return None

    def _push(self, req: Request, tokens: list[int], logprobs: list[TokenLogprobs] | None = None) -> None:
        """Hand ``tokens`` (with their ``logprobs``, when asked) to ``req``'s sink in turn, and retire the request
        at the first that ends it (the rest, speculative tokens past a stop, are dropped)."""
        p = req.params
        for n, token in enumerate(tokens):
            try:
                if req.constraint is not None:
                    req.constraint.consume(token)
                req.output.append(token)
                now = time.perf_counter()
                if len(req.output) == 1:
                    req.first_token_time = now
                    self.metrics.time_to_first_token.observe(now - req.arrival)
                else:
                    self.metrics.time_per_output_token.observe(now - req.last_token_time)
                req.last_token_time = now
                self.metrics.generation_tokens.inc()
                req.sink(TokenEvent(token) if logprobs is None else TokenEvent(token, *logprobs[n]))
            except Exception as e:
                self._fail(req, e)
                return
            if (token in p.stop_token_ids and not p.ignore_eos) or (req.constraint is not None and
                                                                    req.constraint.finished):
                reason: str | None = "stop"
            elif (p.max_tokens is not None and len(req.output) >= p.max_tokens) or \
                    req.n_tokens >= self.max_tokens_capacity():
                reason = "length"
            else:
                reason = None
            if reason is not None:
                self._drop(req)
                self._finish(req, FinishEvent(reason))
                return

    def _fail(self, req: Request, error: BaseException) -> None:
        self._drop(req)
        if isinstance(error, InvalidRequestError | FormatError):  # the request's doing (a grammar past its limits)
            self._finish(req, FinishEvent("invalid", str(error), param=error.param))
        else:
            self._finish(req, FinishEvent("error", f"{type(error).__name__}: {error}"))

    def _finish(self, req: Request, event: FinishEvent) -> None:
        with self._lock:
            if req.finished:  # exactly one FinishEvent per request
                return
            req.finished = True
            self._live.pop(req.id, None)
            forks, req.forks = req.forks, []
        self.metrics.requests_finished.labels(reason=event.reason).inc()
        try:
            req.sink(event)
        except Exception:  # a sink that fails on its last event has nobody left to tell
            pass
        for child in forks:  # choices never forked (its prompt was not in yet) end as it did
            self._finish(child, event)

    def _count_routing(self, adapter: str | None) -> None:
        for moe in self._moe_of[adapter]:
            if moe.last_stats is not None:
                self.metrics.add_expert_load(moe.layer_id, moe.last_stats.tokens_per_expert)

    def _update_gauges(self) -> None:
        m = self.metrics
        m.queue_depth.set(len(self.waiting))
        m.running.set(len(self.running))
        used = self.pool.capacity_blocks - self.pool.free_blocks
        m.kv_blocks_used.set(used)
        m.kv_blocks_total.set(self.pool.capacity_blocks)
        m.kv_blocks_cached.set(self.pool.cached_blocks)
        m.kv_tokens.set(sum(r.table.length for r in self.running))
        m.snapshot_expert_load()


def describe(scheduler: Scheduler) -> dict[str, Any]:
    """The numbers a server prints at start-up."""
    pool = scheduler.pool
    return {"blocks": pool.capacity_blocks, "block_size": pool.block_size,
            "bytes_per_token": scheduler.bytes_per_token,
            "tokens": pool.capacity_blocks * pool.block_size}
