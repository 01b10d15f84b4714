"""n > 1 choices and seeded sampling in a busy batch (issue 24), through the scheduler: a request's other choices
are forked from its prompt once it is cached (its blocks shared, the prompt computed once), each samples with
its own generator, and a seeded request's tokens do not depend on what else is in the batch."""

from __future__ import annotations

import pytest
import torch
from scheduler_helpers import Collector, run_all, submit
from serve_fixtures import tiny_config

from deepseek_moe import DeepSeekMoEForCausalLM
from deepseek_moe.serve.scheduler import FinishEvent, Request, SamplingParams, Scheduler, SchedulerConfig

VOCAB = 300
BS = 4


@pytest.fixture(scope="module")
def sharp() -> DeepSeekMoEForCausalLM:
    """Greedy choices far from ties."""
    torch.manual_seed(0)
    m = DeepSeekMoEForCausalLM(tiny_config(VOCAB)).eval()
    with torch.no_grad():
        m.head.weight.mul_(20.0)
    return m


@pytest.fixture(scope="module")
def flat() -> DeepSeekMoEForCausalLM:
    """Near-uniform next-token distributions: samples of different generators differ."""
    torch.manual_seed(1)
    return DeepSeekMoEForCausalLM(tiny_config(VOCAB)).eval()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def submit_n(s: Scheduler, ids: list[int], params: list[SamplingParams]) -> list[Collector]:
    """One request with len(params) choices: the first submitted, the others its forks."""
    sinks = [Collector() for _ in params]
    reqs = [Request(ids, p, c) for p, c in zip(params, sinks, strict=True)]
    s.submit(reqs[0], forks=reqs[1:])
    return sinks


def assert_pool_empty(s: Scheduler) -> None:
    assert not s.has_work()
    assert s.pool.free_blocks == s.pool.capacity_blocks  # every block unowned: refcounts back at zero
    assert s.pool.audit([]) == []


@pytest.mark.parametrize("prefix_cache", [False, True])
@pytest.mark.parametrize("n_prompt", [8, 10])  # block-aligned, and a partly filled last block (copied)
def test_greedy_choices_equal_one_choice_and_share_the_prompt(sharp: DeepSeekMoEForCausalLM, prefix_cache: bool,
                                                              n_prompt: int) -> None:
    ids = prompt(n_prompt, 3)
    alone = Scheduler(sharp, SchedulerConfig(max_batch_size=8, block_size=BS, prefix_cache=prefix_cache))
    one = submit(alone, ids, max_tokens=8, ignore_eos=True)
    run_all(alone)

    s = Scheduler(sharp, SchedulerConfig(max_batch_size=8, block_size=BS, prefix_cache=prefix_cache))
    sinks = submit_n(s, ids, [SamplingParams(max_tokens=8, ignore_eos=True)] * 3)
    s.step()  # the prompt's prefill: the forks join and sample from its logits
    assert all(len(c.tokens) == 1 for c in sinks)
    # Shared: the prompt's blocks once, plus a copy of a partly filled last block for each fork (3 unshared
    # copies of the prompt would take 3x the blocks).
    full, rest = divmod(n_prompt, BS)
    assert s.pool.capacity_blocks - s.pool.free_blocks == full + (3 if rest else 0)
    tables = [r.table.blocks for r in s.running]
    assert len(tables) == 3 and tables[1][:full] == tables[0][:full] == tables[2][:full]
    run_all(s)
    assert [c.tokens for c in sinks] == [one.tokens] * 3
    assert all(c.finish == FinishEvent("length") for c in sinks)
    # The prompt was computed and counted once: one prefill of n_prompt tokens, then one token per choice and step.
    assert s.metrics.prompt_tokens.value == n_prompt
    assert s.metrics.forward_tokens.value == n_prompt + 3 * 7
    assert_pool_empty(s)


def seeded(seed: int, temperature: float = 1.0, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=12, temperature=temperature, seed=seed, ignore_eos=True, **kw)  # type: ignore[arg-type]


def busy(s: Scheduler, salt: int) -> list[Collector]:
    """Other requests of different lengths and sampling settings (some unseeded: the global generator)."""
    return [submit(s, prompt(3 + 7 * i, salt * 10 + i), max_tokens=4 + 3 * i, temperature=t, top_k=k, top_p=p,
                   seed=seed, ignore_eos=True)
            for i, (t, k, p, seed) in enumerate([(0.0, None, 1.0, None), (0.7, 5, 1.0, None), (1.3, None, 0.8, 99),
                                                 (1.0, None, 1.0, salt)])]


CONFIGS = {
    "default": SchedulerConfig(max_batch_size=8, block_size=BS),
    "chunked prefill": SchedulerConfig(max_batch_size=8, max_batch_tokens=8, block_size=BS),
    "no prefix cache": SchedulerConfig(max_batch_size=8, block_size=BS, prefix_cache=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_seeded_request_is_the_same_alone_and_in_a_busy_batch(flat: DeepSeekMoEForCausalLM, name: str) -> None:
    """Item 3: each request's generator is its own, seeded from its seed alone; batch composition (other rows,
    their lengths, their sampling, unseeded rows drawing from the global generator) does not reach it."""
    ids = prompt(11, 5)
    params = [seeded(1234), seeded(1234, 0.8, top_k=20), seeded(7, 1.5, top_p=0.9)]
    outputs = []
    for salt in (None, 1, 2):  # alone, then in two different busy batches (arriving before and after it)
        s = Scheduler(flat, CONFIGS[name])
        torch.manual_seed(100 + (salt or 0))
        if salt is not None:
            others = busy(s, salt)
        sinks = [submit(s, ids, **vars(p)) for p in params]
        if salt is not None:
            others += busy(s, salt + 50)
        run_all(s)
        assert all(c.finish == FinishEvent("length") for c in sinks)
        outputs.append([c.tokens for c in sinks])
        assert_pool_empty(s)
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0][0] != outputs[0][1]  # the sampling settings matter (same seed, other top_k/temperature)


def test_seeded_choices_are_reproducible_and_differ(flat: DeepSeekMoEForCausalLM) -> None:
    """Choice i seeded seed + i (the app's derivation) equals a lone request with that seed, and the choices
    differ from each other; reproducible across two runs with different company."""
    ids = prompt(9, 6)
    params = [seeded(40 + i) for i in range(3)]
    runs = []
    for salt in (1, 2):
        s = Scheduler(flat, SchedulerConfig(max_batch_size=12, block_size=BS))
        others = busy(s, salt)
        sinks = submit_n(s, ids, params)
        others += busy(s, salt + 50)
        run_all(s)
        runs.append([c.tokens for c in sinks])
        assert all(c.finish == FinishEvent("length") for c in others + sinks)
        assert_pool_empty(s)
    assert runs[0] == runs[1]
    assert len({tuple(t) for t in runs[0]}) == 3, runs[0]
    for p, tokens in zip(params, runs[0], strict=True):
        s = Scheduler(flat, SchedulerConfig(max_batch_size=8, block_size=BS))
        c = submit(s, ids, **vars(p))
        run_all(s)
        assert c.tokens == tokens


def test_a_fork_without_a_block_computes_its_prompt_itself(sharp: DeepSeekMoEForCausalLM,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """When the pool has no block for a fork's copy of the last block, the fork waits in the queue and computes
    its prompt like any request: same greedy tokens, its prompt still counted once."""
    ids = prompt(10, 7)
    s = Scheduler(sharp, SchedulerConfig(max_batch_size=8, block_size=BS, prefix_cache=False))
    monkeypatch.setattr(s.pool, "fork", lambda src, dst: False)
    sinks = submit_n(s, ids, [SamplingParams(max_tokens=6, ignore_eos=True)] * 2)
    run_all(s)
    assert sinks[0].tokens == sinks[1].tokens and len(sinks[0].tokens) == 6
    assert s.metrics.prompt_tokens.value == 10
    assert s.metrics.forward_tokens.value == 20 + 2 * 5  # each computed the prompt
    assert_pool_empty(s)


@pytest.mark.parametrize("n_prompt", [10, 12])
def test_choices_whose_blocks_never_fit_at_once_still_run(sharp: DeepSeekMoEForCausalLM, n_prompt: int) -> None:
    """A pool of 5 blocks, a prompt of 3 and n = 4: even empty, the pool cannot hold the prompt and a block per
    other choice at once. Admission must not wait for that room (it never comes, and the queue behind it would
    wait forever): a request alone in the batch is admitted, and its choices run as blocks allow (a fork without
    a block for its copy computes its prompt later; preemption does the rest), each with n = 1's greedy tokens."""
    from deepseek_moe.model.counting import kv_cache_bytes_per_token

    ids = prompt(n_prompt, 9)
    config = SchedulerConfig(max_batch_size=8, block_size=BS, prefix_cache=False,
                             kv_cache_bytes=kv_cache_bytes_per_token(sharp.config, torch.float32) * BS * 6)
    alone = Scheduler(sharp, config)
    one = submit(alone, ids, max_tokens=4, ignore_eos=True)
    run_all(alone)
    s = Scheduler(sharp, config)
    assert s.pool.capacity_blocks == 5
    sinks = submit_n(s, ids, [SamplingParams(max_tokens=4, ignore_eos=True)] * 4)
    later = submit(s, ids[:5], max_tokens=2, ignore_eos=True)  # queued behind it
    run_all(s, max_steps=500)
    assert [c.tokens for c in sinks] == [one.tokens] * 4
    assert all(c.finish == FinishEvent("length") for c in [*sinks, later])
    assert_pool_empty(s)


def test_cancelled_or_failed_requests_end_their_waiting_forks(sharp: DeepSeekMoEForCausalLM) -> None:
    """A fork cancelled while its request is still in its prompt ends alone; a request that ends before its
    prompt is in (here: an invalid seed, or cancelled) ends its forks the same way. Blocks return to the pool."""
    s = Scheduler(sharp, SchedulerConfig(max_batch_size=8, max_batch_tokens=8, block_size=BS))
    ids = prompt(30, 8)  # 4 chunks of 8
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    sinks = [Collector() for _ in range(3)]
    reqs = [Request(ids, params, c) for c in sinks]
    s.submit(reqs[0], forks=reqs[1:])
    s.step()
    s.cancel(reqs[1].id)
    run_all(s)
    assert sinks[1].finishes == [FinishEvent("cancelled")] and not sinks[1].tokens
    assert sinks[0].tokens == sinks[2].tokens and len(sinks[2].tokens) == 3
    assert_pool_empty(s)

    for how in ("cancel", "seed"):
        s = Scheduler(sharp, SchedulerConfig(max_batch_size=8, max_batch_tokens=8, block_size=BS))
        sinks = [Collector() for _ in range(3)]
        p = SamplingParams(max_tokens=3, seed=2**64 + 5) if how == "seed" else params
        reqs = [Request(ids, p, c) for c in sinks]
        s.submit(reqs[0], forks=reqs[1:])
        if how == "cancel":
            s.step()
            s.cancel(reqs[0].id)
        run_all(s)
        reasons = [c.finishes for c in sinks]
        want = "cancelled" if how == "cancel" else "invalid"
        assert all(len(r) == 1 and r[0].reason == want for r in reasons), reasons
        assert not any(c.tokens for c in sinks)
        assert_pool_empty(s)


def test_submit_refuses_more_choices_than_rows_and_mismatched_forks(sharp: DeepSeekMoEForCausalLM) -> None:
    s = Scheduler(sharp, SchedulerConfig(max_batch_size=2, block_size=BS))
    with pytest.raises(ValueError, match=r"3 choices \(n\) exceed max_batch_size \(2\)"):
        submit_n(s, [1, 2], [SamplingParams()] * 3)
    with pytest.raises(ValueError, match="its request.s prompt and adapter"):
        s.submit(Request([1, 2], SamplingParams(), Collector()), forks=[Request([1, 3], SamplingParams(), Collector())])
