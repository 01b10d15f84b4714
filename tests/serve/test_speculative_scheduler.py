"""Speculative decoding in the scheduler: greedy rows in a busy batch (chunked prefill, requests joining, prefix
caching, preemption) give the plain greedy tokens of generate() alone, while drafts are accepted and rejected;
the counts reach the request and /metrics."""

from __future__ import annotations

import torch
from scheduler_helpers import Collector, assert_busy_batch_matches_alone, run_all, submit
from serve_fixtures import tiny_config

from deepseek_moe import DeepSeekMoEForCausalLM, generate
from deepseek_moe.infer.draft import NgramDrafter
from deepseek_moe.model.counting import kv_cache_bytes_per_token
from deepseek_moe.quant import QuantConfig, quantize_model
from deepseek_moe.serve.scheduler import FinishEvent, Request, SamplingParams, Scheduler, SchedulerConfig


def make_model(seed: int = 0) -> DeepSeekMoEForCausalLM:
    torch.manual_seed(seed)
    return DeepSeekMoEForCausalLM(tiny_config(512)).eval()


def repetitive_prompts(lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    """Prompts made of a short random motif repeated, so that n-gram drafts find matches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        motif = torch.randint(1, 512, (max(n // 3, 1),), generator=g).tolist()
        out.append((motif * 4)[:n])
    return out


def spec_config(**kw: object) -> SchedulerConfig:
    return SchedulerConfig(speculative="ngram", num_draft_tokens=4, **kw)  # type: ignore[arg-type]


def test_busy_batch_with_speculation_gives_each_request_its_greedy_tokens_alone() -> None:
    model = make_model()
    ps = repetitive_prompts((3, 40, 9, 70, 1, 25))
    n_new = [30, 12, 40, 16, 30, 20]
    s = assert_busy_batch_matches_alone(
        model, spec_config(max_batch_size=4, max_batch_tokens=24, block_size=4, kv_cache_bytes=1 << 22), ps, n_new)
    m = s.metrics
    assert 0 < m.spec_accepted_tokens.value < m.spec_draft_tokens.value  # both branches ran
    # Fewer decode forwards than tokens: each verification emitted its accepted drafts and one more.
    assert m.spec_accepted_tokens.value + m.spec_verifications.value < m.generation_tokens.value
    text = m.render()
    assert f"deepseek_moe_spec_accepted_tokens_total {int(m.spec_accepted_tokens.value)}" in text
    assert f"deepseek_moe_spec_draft_tokens_total {int(m.spec_draft_tokens.value)}" in text


def test_request_counts_its_drafts_and_stop_tokens_end_a_verified_run() -> None:
    model = make_model()
    p = repetitive_prompts((30,))[0]
    want = generate(model, [p], max_new_tokens=40).new_tokens[0]
    # The first token new after a repeating run, so that drafts were verified before it.
    stop = next(t for i, t in enumerate(want) if i >= 12 and want.index(t) == i)
    cut = want[:want.index(stop) + 1]
    s = Scheduler(model, spec_config(block_size=4, kv_cache_bytes=1 << 22))
    c = Collector()
    req = s.submit(Request(p, SamplingParams(max_tokens=40, stop_token_ids=frozenset({stop})), c))
    run_all(s)
    assert c.tokens == cut and c.finish == FinishEvent("stop")
    stats = req.speculative
    assert stats.drafted > 0 and stats.accepted > 0
    assert stats.mean_acceptance_length == (stats.accepted + stats.steps) / stats.steps > 1.0


def test_sampled_path_with_top_k_1_is_greedy() -> None:
    """temperature 1 with top_k 1 is a point mass on the argmax: the sampled acceptance path (probabilities after
    the sampling transform, rejection draws) must then give the greedy tokens."""
    model = make_model()
    ps = repetitive_prompts((20, 7))
    alone = [generate(model, [p], max_new_tokens=25).new_tokens[0] for p in ps]
    s = Scheduler(model, spec_config(block_size=4, kv_cache_bytes=1 << 22))
    out = [submit(s, p, max_tokens=25, temperature=1.0, top_k=1, seed=3) for p in ps]
    run_all(s)
    assert [c.tokens for c in out] == alone
    assert s.metrics.spec_accepted_tokens.value > 0


def test_preempted_speculative_requests_give_their_greedy_tokens() -> None:
    model = make_model()
    ps = repetitive_prompts((5, 9, 3, 7, 6))
    greedy = [generate(model, [p], max_new_tokens=20).new_tokens[0] for p in ps]
    per_token = kv_cache_bytes_per_token(model.config, torch.float32)
    # 12 blocks of 4 = 48 slots for 5 requests that grow to 25 + 29 + 23 + 27 + 26 tokens: preemptions needed.
    s = Scheduler(model, spec_config(block_size=4, kv_cache_bytes=13 * 4 * per_token, max_batch_size=8,
                                     max_batch_tokens=16, prefix_cache=False))
    out = [submit(s, p, max_tokens=20) for p in ps]
    run_all(s)
    assert s.preemptions > 0
    assert s.metrics.spec_accepted_tokens.value > 0
    assert [c.tokens for c in out] == greedy
    assert s.pool.free_blocks == s.pool.capacity_blocks


def test_int8_and_int4_models_verify_with_their_own_kernels() -> None:
    for bits in (8, 4):
        model = quantize_model(make_model(), QuantConfig(bits=bits))
        ps = repetitive_prompts((10, 30))
        plain = generate(model, ps, max_new_tokens=20)
        spec = generate(model, ps, max_new_tokens=20, drafter=NgramDrafter())
        assert spec.new_tokens == plain.new_tokens, bits
        assert spec.speculative is not None and spec.speculative.accepted > 0
        alone = [generate(model, [p], max_new_tokens=20).new_tokens[0] for p in ps]
        s = Scheduler(model, spec_config(block_size=4, kv_cache_bytes=1 << 22))
        out = [submit(s, p, max_tokens=20) for p in ps]
        run_all(s)
        assert [c.tokens for c in out] == alone, bits
