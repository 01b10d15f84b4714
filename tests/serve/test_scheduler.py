"""The scheduler without HTTP: continuous batching gives each request what it gets alone, within its limits."""

from __future__ import annotations

import pytest
import torch
from scheduler_helpers import Collector, assert_busy_batch_matches_alone, run_all, submit
from serve_fixtures import tiny_config

from deepseek_moe import DeepSeekMoEForCausalLM, ModelConfig, MoEConfig, generate, get_preset
from deepseek_moe.serve.scheduler import (
    Event,
    FinishEvent,
    QueueFullError,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    SchedulerStoppedError,
    TokenEvent,
)


def make_model(cfg: object = None, seed: int = 0) -> DeepSeekMoEForCausalLM:
    torch.manual_seed(seed)
    return DeepSeekMoEForCausalLM(cfg or tiny_config(512)).eval()


def prompts(vocab: int, lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("preset", ["test", "tiny"])
def test_busy_batch_gives_each_request_its_greedy_tokens_alone(preset: str) -> None:
    """Mixed lengths, chunked prefill (a 24-token step budget cuts the long prompts), requests joining while
    others decode: every row's greedy tokens equal generate() on that prompt alone (the dense cache, B=1)."""
    model = make_model(get_preset("tiny") if preset == "tiny" else None)
    vocab = model.config.vocab_size
    ps = prompts(vocab, (3, 40, 9, 70, 1, 25))
    n_new = [12, 5, 20, 8, 15, 10]
    assert_busy_batch_matches_alone(model, SchedulerConfig(max_batch_size=4, max_batch_tokens=24, block_size=4,
                                                            kv_cache_bytes=1 << 22), ps, n_new)


def mid_size() -> ModelConfig:
    """Four layers, dim 512, q-LoRA, 32 routed experts (top 6) in 4 groups (2 per token), 2 shared."""
    dim = 512
    return ModelConfig(
        vocab_size=8192, dim=dim, inter_dim=1408, n_layers=4, n_dense_layers=1, n_heads=8, q_lora_rank=192,
        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_seq_len=1024,
        original_seq_len=1024,
        moe=MoEConfig(dim=dim, moe_inter_dim=176, n_routed_experts=32, n_activated_experts=6, n_shared_experts=2,
                      n_expert_groups=4, n_limited_groups=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mid_size_model_in_a_busy_batch_gives_its_greedy_tokens_alone(dtype: torch.dtype) -> None:
    model = make_model(mid_size()).to(dtype)
    ps = prompts(8192, (5, 70, 17))
    alone = [generate(model, [p], max_new_tokens=6).new_tokens[0] for p in ps]
    s = Scheduler(model, SchedulerConfig(max_batch_size=4, max_batch_tokens=32, kv_cache_bytes=1 << 24))
    out = [submit(s, p, max_tokens=6) for p in ps]
    run_all(s)
    assert [c.tokens for c in out] == alone


def test_logits_of_a_batched_row_match_alone_within_float_rounding() -> None:
    model = make_model()
    p_long, p_short = prompts(512, (30, 4))
    with torch.inference_mode():
        ref_cache = model.new_cache()
        ref = model(torch.tensor([p_long]), cache=ref_cache).logits[0, -1]
    s = Scheduler(model, SchedulerConfig(max_batch_size=2, max_batch_tokens=8, block_size=4))
    captured: list[torch.Tensor] = []
    emit = s._choose
    s._choose = lambda req, logits, *rest: (captured.append(logits.clone()) if req.prompt == p_long else None,  # type: ignore[method-assign]
                                          emit(req, logits, *rest))[1]
    submit(s, p_short, max_tokens=20)
    submit(s, p_long, max_tokens=1)
    run_all(s)
    torch.testing.assert_close(captured[0], ref, atol=1e-5, rtol=1e-5)


def test_limits_batch_size_and_tokens_per_step() -> None:
    model = make_model()
    s = Scheduler(model, SchedulerConfig(max_batch_size=2, max_batch_tokens=6, block_size=4))
    seen: list[tuple[int, int]] = []
    forward = s._forward

    def spy(reqs: list[Request], ids: list[list[int]], *rest: int) -> torch.Tensor:
        seen.append((len(reqs), sum(len(x) for x in ids)))
        return forward(reqs, ids, *rest)

    s._forward = spy  # type: ignore[method-assign]
    cs = [submit(s, p, max_tokens=4) for p in prompts(512, (10, 3, 7))]
    while s.has_work():
        before = len(seen)
        s.step()
        step = seen[before:]
        assert len(s.running) <= 2
        assert sum(n for _, n in step) <= 6  # tokens per step, prefill chunks included
    assert all(c.finish == FinishEvent("length") and len(c.tokens) == 4 for c in cs)


def test_requests_wait_for_cache_blocks_and_queue_overflow_is_refused() -> None:
    model = make_model()
    from deepseek_moe.model.counting import kv_cache_bytes_per_token

    per_token = kv_cache_bytes_per_token(model.config, torch.float32)
    # 1 padding block + 4 blocks of 4 tokens: room for one 10 + 6 request at a time.
    s = Scheduler(model, SchedulerConfig(max_batch_size=4, max_batch_tokens=16, block_size=4, max_queue=3,
                                         kv_cache_bytes=5 * 4 * per_token))
    a = submit(s, prompts(512, (10,))[0], max_tokens=6)
    b = submit(s, prompts(512, (10,), seed=2)[0], max_tokens=6)
    c = submit(s, [5], max_tokens=1)
    with pytest.raises(QueueFullError):
        submit(s, [5], max_tokens=1)
    s.step()
    assert len(s.running) == 1 and len(s.waiting) == 2  # b waits for blocks; c does not overtake it
    run_all(s)
    assert [len(x.tokens) for x in (a, b, c)] == [6, 6, 1]
    with pytest.raises(ValueError, match="exceeds what one request can hold"):
        submit(s, [5] * 10, max_tokens=20)


def test_cancel_frees_the_slot_at_the_next_step() -> None:
    model = make_model()
    s = Scheduler(model, SchedulerConfig(max_batch_size=1, block_size=4))
    a = submit(s, [1, 2, 3], max_tokens=50)
    b = submit(s, [4, 5], max_tokens=3)
    s.step()
    s.step()
    assert s.running and s.running[0].sink is a and len(s.waiting) == 1
    s.cancel(s.running[0].id)
    s.step()  # a retired, b admitted in the same step
    assert a.finish == FinishEvent("cancelled") and len(a.tokens) == 2
    assert s.running and s.running[0].sink is b
    run_all(s)
    assert b.finish == FinishEvent("length")
    assert s.pool.free_blocks == s.pool.capacity_blocks


def test_an_exception_in_one_requests_step_fails_only_that_request() -> None:
    model = make_model()
    poison = 7
    forward = model.forward

    def flaky(input_ids: torch.Tensor, **kw: object) -> object:
        if bool((input_ids == poison).any()):
            raise RuntimeError("poisoned token")
        return forward(input_ids, **kw)  # type: ignore[arg-type]

    model.forward = flaky  # type: ignore[method-assign]
    s = Scheduler(model, SchedulerConfig(max_batch_size=4, block_size=4))
    ok = [submit(s, p, max_tokens=6) for p in prompts(512, (5, 9))]
    ok_alone = [generate(make_model(), [p], max_new_tokens=6).new_tokens[0] for p in prompts(512, (5, 9))]
    s.step()  # both decoding now; the poisoned request joins the decode batch after its prefill
    bad_prefill = submit(s, [1, poison, 2], max_tokens=3)

    class Exploding(Collector):
        def __call__(self, event: Event) -> None:
            super().__call__(event)
            if isinstance(event, TokenEvent) and len(self.tokens) == 2:
                raise ValueError("client callback broke")

    bad_sink = Exploding()
    s.submit(Request([3, 4], SamplingParams(max_tokens=10), bad_sink))
    run_all(s)
    assert [c.tokens for c in ok] == ok_alone
    assert all(c.finish == FinishEvent("length") for c in ok)
    assert bad_prefill.finish is not None and bad_prefill.finish.reason == "error"
    assert "poisoned token" in (bad_prefill.finish.error or "")
    assert bad_sink.finish is not None and bad_sink.finish.reason == "error" and len(bad_sink.tokens) == 2
    assert s.pool.free_blocks == s.pool.capacity_blocks


def test_a_decode_batch_that_raises_is_retried_row_by_row() -> None:
    model = make_model()
    forward = model.forward
    calls = {"n": 0}

    def flaky(input_ids: torch.Tensor, **kw: object) -> object:
        # The request whose last token is 9 breaks every forward it is part of, from its second token on.
        if input_ids.shape[1] == 1 and bool((input_ids[:, 0] == 9).any()):
            calls["n"] += 1
            raise RuntimeError("bad row")
        return forward(input_ids, **kw)  # type: ignore[arg-type]

    model.forward = flaky  # type: ignore[method-assign]
    s = Scheduler(model, SchedulerConfig(max_batch_size=4, block_size=4))
    good = submit(s, [1, 2, 3], max_tokens=5)
    bad = Collector()
    s.submit(Request([9, 9], SamplingParams(max_tokens=5, temperature=0.0), bad))
    # After its prefill, make the token fed back a 9, so its decode rows raise.
    s.step()
    for r in s.running:
        if r.sink is bad:
            r.output[-1] = 9
    run_all(s)
    want = generate(make_model(), [[1, 2, 3]], max_new_tokens=5).new_tokens[0]
    assert good.tokens == want and good.finish == FinishEvent("length")
    assert bad.finish is not None and bad.finish.reason == "error"
    assert calls["n"] >= 2  # the batch, then the row alone


def test_seeded_sampling_does_not_depend_on_the_batch() -> None:
    model = make_model()
    p = prompts(512, (6,))[0]
    params = dict(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    s = Scheduler(model, SchedulerConfig(max_batch_size=8, block_size=4))
    alone = submit(s, p, **params)
    run_all(s)
    others = [submit(s, q, max_tokens=12, temperature=1.0, seed=i) for i, q in enumerate(prompts(512, (3, 8, 2)))]
    busy = submit(s, p, **params)
    run_all(s)
    assert busy.tokens == alone.tokens
    assert any(o.tokens != alone.tokens for o in others)


def test_stop_tokens_and_ignore_eos() -> None:
    model = make_model()
    p = prompts(512, (5,))[0]
    s = Scheduler(model, SchedulerConfig(block_size=4))
    free = submit(s, p, max_tokens=6)
    run_all(s)
    stop_at = free.tokens[2]
    stopped = submit(s, p, max_tokens=6, stop_token_ids=frozenset({stop_at}))
    ignored = submit(s, p, max_tokens=6, stop_token_ids=frozenset({stop_at}), ignore_eos=True)
    run_all(s)
    first = free.tokens.index(stop_at)
    assert stopped.tokens == free.tokens[:first + 1] and stopped.finish == FinishEvent("stop")
    assert ignored.tokens == free.tokens and ignored.finish == FinishEvent("length")


def test_threaded_loop_and_shutdown_end_requests_in_flight() -> None:
    model = make_model()
    s = Scheduler(model, SchedulerConfig(max_batch_size=1, block_size=4))
    s.start()
    assert s.is_running
    done = submit(s, [1, 2], max_tokens=3)
    waiting = [submit(s, [1, 2, 3], max_tokens=200) for _ in range(3)]
    s.shutdown(timeout=0.0)
    assert not s.is_running
    with pytest.raises(SchedulerStoppedError):
        submit(s, [1], max_tokens=1)
    for c in [done, *waiting]:
        assert c.finish is not None and c.finish.reason in ("length", "shutdown")
    assert any(c.finish == FinishEvent("shutdown", c.finish.error) for c in waiting)


def test_config_rules_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"max_batch_tokens \(4\) must be >= max_batch_size \(8\)"):
        SchedulerConfig(max_batch_size=8, max_batch_tokens=4)
    with pytest.raises(ValueError, match=r"max_queue \(-1\)"):
        SchedulerConfig(max_queue=-1)
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        Scheduler(make_model(), SchedulerConfig(kv_cache_bytes=100))
