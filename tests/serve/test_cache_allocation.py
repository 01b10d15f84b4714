"""Blocks are allocated as sequences grow; the newest request is preempted when the pool runs out and recomputed
later with the output it would have had; a step's cache gathers stay within GATHER_BOUND x the cache budget."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scheduler_helpers import run_all, submit
from serve_fixtures import tiny_config

from deepseek_moe import DeepSeekMoEForCausalLM, generate
from deepseek_moe.model.counting import kv_cache_bytes_per_token
from deepseek_moe.model.kv_cache import GATHER_BOUND, plan_gathers
from deepseek_moe.serve.scheduler import (
    FinishEvent,
    Request,
    Scheduler,
    SchedulerConfig,
)


def make_model() -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(tiny_config(512)).eval()
    with torch.no_grad():  # sharper logits: greedy choices far from ties
        model.head.weight.mul_(20.0)
    return model


def prompts(lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 512, (n,), generator=g).tolist() for n in lengths]


def blocks_config(model: DeepSeekMoEForCausalLM, n_blocks: int, block_size: int = 4, **kw: int) -> SchedulerConfig:
    """A pool of exactly ``n_blocks`` blocks (one of them the padding block)."""
    per_token = kv_cache_bytes_per_token(model.config, torch.float32)
    return SchedulerConfig(block_size=block_size, kv_cache_bytes=n_blocks * block_size * per_token, **kw)


def test_preempted_requests_give_the_output_of_an_unpreempted_run() -> None:
    model = make_model()
    ps = prompts((5, 9, 3, 7, 6))
    greedy = [generate(model, [p], max_new_tokens=20).new_tokens[0] for p in ps[:4]]
    sampled = dict(max_tokens=20, temperature=1.0, top_k=40, seed=77)
    roomy = Scheduler(model, SchedulerConfig(block_size=4, kv_cache_bytes=1 << 22))
    unpreempted = submit(roomy, ps[4], **sampled)
    run_all(roomy)
    assert roomy.preemptions == 0
    # 12 blocks of 4 = 48 slots for 5 requests that grow to 30 + 29 + 23 + 27 + 26 tokens: preemptions needed.
    s = Scheduler(model, blocks_config(model, 13, max_batch_size=8, max_batch_tokens=16))
    out = [submit(s, p, max_tokens=20) for p in ps[:4]] + [submit(s, ps[4], **sampled)]
    run_all(s)
    assert s.preemptions > 0 and f"deepseek_moe_preemptions_total {s.preemptions}" in s.metrics.render()
    assert [c.tokens for c in out[:4]] == greedy
    assert out[4].tokens == unpreempted.tokens
    assert all(c.finish == FinishEvent("length") for c in out)
    assert s.pool.free_blocks == s.pool.capacity_blocks


def test_requests_without_max_tokens_share_the_pool() -> None:
    """Issue 19: a chat request without max_tokens used to reserve the whole context, so batching degenerated to
    batch 1. Now 8 such requests run at once, and each is bounded by what one request can hold."""
    model = make_model()
    s = Scheduler(model, blocks_config(model, 65, max_batch_size=8))  # 256 slots: one whole context
    cs = [submit(s, p) for p in prompts((4, 6, 5, 3, 7, 2, 8, 5))]
    for _ in range(3):
        s.step()
    assert len(s.running) == 8 and not s.waiting
    for r in list(s.running):
        s.cancel(r.id)
    s.step()
    assert all(c.finish == FinishEvent("cancelled") for c in cs)
    assert s.pool.free_blocks == s.pool.capacity_blocks

    small = Scheduler(model, blocks_config(model, 17))  # 64 slots, fewer than the 256-token context
    p = prompts((5,))[0]
    alone = submit(small, p)
    run_all(small)
    assert small.max_tokens_capacity() == 64
    assert alone.finish == FinishEvent("length") and len(alone.tokens) == 64 - 5
    assert alone.tokens == generate(model, [p], max_new_tokens=59).new_tokens[0]


def test_one_long_row_among_short_ones_gathers_within_the_bound() -> None:
    """Issue 19: one step gathered every row to the longest (B x S_max per layer): 15 rows padded to 184 slots
    would gather 2760 slots from a 320-slot pool. Counted in bytes, per forward and per step."""
    model = make_model()
    cfg = blocks_config(model, 81, max_batch_size=16, max_batch_tokens=256)
    per_token = kv_cache_bytes_per_token(model.config, torch.float32)
    budget = cfg.kv_cache_bytes
    long_prompt, *shorts = prompts((180,) + (3,) * 14)
    want = [generate(model, [p], max_new_tokens=4).new_tokens[0] for p in [long_prompt, *shorts]]
    s = Scheduler(model, cfg)
    cs = [submit(s, p, max_tokens=4) for p in [long_prompt, *shorts]]
    per_forward: list[tuple[int, int]] = []  # (gathered bytes, bytes its rows hold after it)
    forward = s._forward

    def counted(reqs: list[Request], ids: list[list[int]], *rest: int) -> torch.Tensor:
        before = s.pool.gathered_bytes
        out = forward(reqs, ids, *rest)
        held = sum(r.table.length for r in reqs) * per_token
        per_forward.append((s.pool.gathered_bytes - before, held))
        return out

    s._forward = counted  # type: ignore[method-assign]
    widest = 0
    while s.has_work():
        before = s.pool.gathered_bytes
        rows = [(r.table.length, len(r.prompt) + len(r.output)) for r in s.running]
        s.step()
        if rows:
            widest = max(widest, len(rows) * max(n for _, n in rows))
        assert s.pool.gathered_bytes - before <= GATHER_BOUND * budget
    assert widest * per_token > GATHER_BOUND * budget  # one forward per step would have broken the bound
    assert all(gathered <= GATHER_BOUND * held for gathered, held in per_forward)
    assert [c.tokens for c in cs] == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 64)), min_size=1, max_size=40),
       st.sampled_from([1.0, 1.5, 2.0, 4.0]))
def test_plan_gathers_splits_every_row_once_within_the_bound(rows: list[tuple[int, int]], bound: float) -> None:
    cached, new = [c for c, _ in rows], [n for _, n in rows]
    groups = plan_gathers(cached, new, bound)
    assert sorted(i for g in groups for i in g) == list(range(len(rows)))
    for g in groups:
        padded = len(g) * (max(cached[i] for i in g) + max(new[i] for i in g))
        assert padded <= bound * sum(cached[i] + new[i] for i in g)
    if len(set(c + n for c, n in rows)) == 1 and len(set(new)) == 1:
        assert len(groups) == 1  # equal rows are never split
