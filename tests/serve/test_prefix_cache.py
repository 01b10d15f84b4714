"""Prefix caching: shared, partially shared, evicted and preempted prefixes give the outputs (greedy tokens, fp32
logits) of the same requests without the cache; block reference counts return to zero; the audit sees shared
blocks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from serve_fixtures import tiny_config

from deepseek_moe import DeepSeekMoEForCausalLM
from deepseek_moe.model.kv_cache import BlockPool, BlockTable, chain_block_hashes
from deepseek_moe.serve.scheduler import (
    FinishEvent,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    SchedulerInvariantError,
    TokenEvent,
)

VOCAB = 512
BS = 4


def make_model(seed: int = 0) -> DeepSeekMoEForCausalLM:
    torch.manual_seed(seed)
    model = DeepSeekMoEForCausalLM(tiny_config(VOCAB)).eval()
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # sharp logits: greedy choices far from float-rounding ties
    return model


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Recording(Scheduler):
    """Keeps the logits each request's tokens were chosen from."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logits: dict[int, list[torch.Tensor]] = {}

    def _choose(self, req: Request, logits_V: torch.Tensor, argmax: int | None = None) -> int | None:
        self.logits.setdefault(req.id, []).append(logits_V.float().clone())
        return super()._choose(req, logits_V, argmax)


class Out:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish: FinishEvent | None = None

    def __call__(self, event: object) -> None:
        if isinstance(event, TokenEvent):
            self.tokens.append(event.token)
        else:
            assert isinstance(event, FinishEvent)
            self.finish = event


def run(model: DeepSeekMoEForCausalLM, waves: list[list[list[int]]], *, prefix_cache: bool, max_tokens: int = 6,
        kv_cache_bytes: int = 1 << 22, max_batch_tokens: int = 64
        ) -> tuple[list[list[int]], list[torch.Tensor], Recording]:
    """Each wave's prompts submitted together and run to the end before the next wave; returns every request's
    tokens and its stacked logits, in submission order."""
    s = Recording(model, SchedulerConfig(max_batch_size=8, max_batch_tokens=max_batch_tokens, block_size=BS,
                                         kv_cache_bytes=kv_cache_bytes, prefix_cache=prefix_cache))
    outs: list[tuple[Request, Out]] = []
    for wave in waves:
        for p in wave:
            out = Out()
            outs.append((s.submit(Request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True), out)), out))
        while s.has_work():
            s.step()  # check_invariants runs at the end of each step, shared blocks included
    for _, out in outs:
        assert out.finish == FinishEvent("length")
    return [o.tokens for _, o in outs], [torch.stack(s.logits[r.id]) for r, _ in outs], s


def assert_same_as_without_cache(model: DeepSeekMoEForCausalLM, waves: list[list[list[int]]], **kw: Any) -> Recording:
    got, got_logits, s = run(model, waves, prefix_cache=True, **kw)
    want, want_logits, plain = run(model, waves, prefix_cache=False, **kw)
    assert got == want
    for g, w in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    assert plain.metrics.prefix_cache_hits.value == 0 and plain.pool.cached_blocks == 0
    # Nothing is held once every request is done: each block is free or cached, with no references.
    assert s.pool.free_blocks == s.pool.capacity_blocks and not any(s.pool._refs[1:])
    assert s.pool.audit([]) == []
    return s


SYSTEM = tokens(37, seed=1)  # 9 full blocks and one token


def test_a_shared_prefix_is_reused_and_outputs_do_not_change() -> None:
    model = make_model()
    first = SYSTEM + tokens(5, 2)
    later = [SYSTEM + tokens(6, 3), SYSTEM + tokens(1, 4), list(first)]  # the last: the whole prompt cached
    s = assert_same_as_without_cache(model, [[first], later])
    hits = s.metrics.prefix_cache_hits.value
    # Each later prompt reuses the 9 full blocks of SYSTEM (36 tokens); the repeat of ``first`` (42 tokens)
    # reuses its 10 full blocks but its last two tokens are computed (the last one always is, for its logits).
    assert hits == 36 + 36 + 40
    assert s.metrics.prefix_cache_queries.value == sum(map(len, [first, *later]))
    assert s.metrics.prompt_tokens.value == s.metrics.prefix_cache_queries.value - hits
    # The independent reference: the first token of a prompt that reused blocks is the plain forward's.
    with torch.no_grad():
        ref = model(torch.tensor([later[0]])).logits[0, -1]
    torch.testing.assert_close(s.logits[max(s.logits) - 2][0], ref, atol=1e-5, rtol=0)


def test_partially_shared_prefixes_reuse_only_their_common_blocks() -> None:
    model = make_model()
    base = SYSTEM + tokens(8, 5)
    branch = SYSTEM[:22] + tokens(30, 6)  # shares 5 full blocks (20 tokens), then differs inside block 6
    fork = base[:41] + tokens(3, 7)  # shares 10 full blocks with base
    s = assert_same_as_without_cache(model, [[base], [branch], [fork]])
    assert s.metrics.prefix_cache_hits.value == 20 + 40


def test_requests_admitted_together_pick_up_the_prefix_one_of_them_computes() -> None:
    """Submitted at once, with a step budget of 16 tokens: the second prompt finds the first one's blocks
    before its own first chunk runs (the match is retried while a request is block-aligned)."""
    model = make_model()
    wave = [SYSTEM + tokens(3, 8), SYSTEM + tokens(4, 9), SYSTEM + tokens(2, 10)]
    s = assert_same_as_without_cache(model, [wave], max_batch_tokens=16)
    assert s.metrics.prefix_cache_hits.value > 0


def test_evicted_prefixes_are_recomputed_correctly() -> None:
    """A pool of 30 blocks: the many distinct prompts between two uses of SYSTEM evict its blocks (least
    recently released first), so the last request reuses only what survived, or nothing."""
    model = make_model()
    small = 31 * BS * Scheduler(model, SchedulerConfig(block_size=BS, kv_cache_bytes=1 << 22)).bytes_per_token
    waves = [[SYSTEM + tokens(3, 11)], [tokens(40, 12), tokens(40, 13)], [tokens(40, 14), tokens(40, 15)],
             [SYSTEM + tokens(5, 16)]]
    s = assert_same_as_without_cache(model, waves, kv_cache_bytes=small)
    assert s.pool.capacity_blocks == 30
    assert s.pool.evictions > 0
    assert s.metrics.prefix_cache_hits.value < 36  # not the whole of SYSTEM survived


def test_preempted_requests_with_shared_blocks_give_the_unpreempted_outputs() -> None:
    """Twelve blocks for three requests sharing SYSTEM's first 16 tokens, each growing to 40 tokens: they preempt
    one another, release shared blocks (held by the others too) and find their own blocks again on return."""
    model = make_model()
    head = SYSTEM[:16]
    prompts = [head + tokens(6, 17), head + tokens(4, 18), head + tokens(9, 19)]
    small = 13 * BS * Scheduler(model, SchedulerConfig(block_size=BS, kv_cache_bytes=1 << 22)).bytes_per_token
    s = assert_same_as_without_cache(model, [[prompts[0]], prompts], max_tokens=16, kv_cache_bytes=small)
    assert s.preemptions > 0


def test_no_prefix_cache_leaves_no_blocks_cached() -> None:
    model = make_model()
    _, _, s = run(model, [[SYSTEM], [SYSTEM + [1]]], prefix_cache=False)
    assert s.pool.cached_blocks == 0 and s.metrics.prefix_cache_hits.value == 0
    assert s.metrics.prompt_tokens.value == 2 * len(SYSTEM) + 1


# --- the pool's bookkeeping, by hand -------------------------------------------------------------------------


def test_chained_keys_depend_on_every_earlier_token_and_the_salt() -> None:
    a = chain_block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # full blocks only
    assert chain_block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == a
    assert chain_block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)[1] != a[1]  # same block 2, another prefix
    assert chain_block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, b"adapter")[0] != a[0]
    assert chain_block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, known=a[:1]) == a


def test_refcounts_lru_and_eviction_order() -> None:
    pool = BlockPool(n_layers=1, n_blocks=7, block_size=2)  # 6 usable blocks
    keys = chain_block_hashes([1, 2, 3, 4, 5, 6], 2)
    a = BlockTable()
    assert pool.reserve(a, 6)
    a.length = 6  # as if a forward had cached 6 tokens
    pool.register(a, keys)
    b = BlockTable()
    assert pool.reserve(b, 5)  # 3 fresh blocks
    assert pool.match(b, keys[:2]) == 2  # its first two blocks become a's; the two reservations are freed
    assert b.blocks[:2] == a.blocks[:2] and b.length == 4 and len(b.blocks) == 3
    assert [pool._refs[x] for x in a.blocks] == [2, 2, 1] and pool.free_blocks == 2
    assert pool.audit([a, b]) == []
    pool.release(a)  # a's third block has a key and no other holder: cached, not freed
    assert pool.cached_blocks == 1 and pool.free_blocks == 3
    pool.release(b)
    assert pool.cached_blocks == 3 and pool.free_blocks == 6 and not any(pool._refs)
    assert pool.audit([]) == []
    # Released last-block-first: the LRU evicts the tail of the prefix (a's third block) before its head.
    c = BlockTable()
    assert pool.reserve(c, 8)  # 3 free + 1 evicted
    assert pool.evictions == 1
    d = BlockTable()
    assert pool.match(d, keys) == 2 and pool.audit([c, d]) == []


def test_audit_sees_a_wrong_reference_count_on_a_shared_block() -> None:
    pool = BlockPool(n_layers=1, n_blocks=5, block_size=2)
    keys = chain_block_hashes([1, 2, 3, 4], 2)
    a, b = BlockTable(), BlockTable()
    pool.reserve(a, 4)
    a.length = 4
    pool.register(a, keys)
    pool.match(b, keys[:1])
    assert pool.audit([a, b]) == []
    assert any("reference count" in p for p in pool.audit([a]))  # a holder the pool counts is missing
    pool._refs[a.blocks[0]] = 1
    assert any("reference count" in p for p in pool.audit([a, b]))


def test_truncate_refuses_to_cut_into_a_registered_block() -> None:
    pool = BlockPool(n_layers=1, n_blocks=5, block_size=2)
    a = BlockTable()
    pool.reserve(a, 4)
    a.length = 4
    pool.register(a, chain_block_hashes([1, 2, 3, 4], 2))
    with pytest.raises(ValueError, match="registered"):
        pool.truncate(a, 3)
    pool.truncate(a, 2)  # on a block boundary: the second block is dropped (cached)
    assert a.blocks and len(a.blocks) == 1 and pool.cached_blocks == 1 and pool.audit([a]) == []


def test_the_scheduler_check_fires_on_a_corrupted_shared_block() -> None:
    model = make_model()
    s = Scheduler(model, SchedulerConfig(max_batch_size=4, block_size=BS, kv_cache_bytes=1 << 22))
    s.submit(Request(SYSTEM + [1], SamplingParams(max_tokens=30), Out()))
    s.step()
    s.submit(Request(SYSTEM + [2], SamplingParams(max_tokens=30), Out()))
    s.step()
    ra, rb = s.running
    shared = set(ra.table.blocks) & set(rb.table.blocks)
    assert shared
    s.pool._refs[min(shared)] -= 1  # a holder gone missing: freeing one would free it under the other
    with pytest.raises(SchedulerInvariantError, match="reference count"):
        s.step()


def test_the_no_prefix_cache_flag_reaches_the_scheduler_config(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Any) -> None:
    import deepseek_moe.serve.server as server
    from deepseek_moe.cli.main import main

    seen: list[SchedulerConfig] = []
    monkeypatch.setattr(server, "serve", lambda path, **kw: seen.append(kw["config"]))
    assert main(["serve", str(tmp_path)]) == 0
    assert main(["serve", str(tmp_path), "--no-prefix-cache"]) == 0
    assert [c.prefix_cache for c in seen] == [True, False]
