"""One request's failure stays that request's: it gets an error naming itself, its blocks come back, the others
run on unchanged, the block-ownership invariant is checked after every step, and shutdown answers everyone."""

from __future__ import annotations

import json
import re
import signal
import threading
from pathlib import Path

import httpx
import pytest
import torch
from scheduler_helpers import run_all, submit
from serve_fixtures import build_checkpoint, running_server, tiny_config

from deepseek_moe import DeepSeekMoEForCausalLM, generate
from deepseek_moe.serve.scheduler import (
    FinishEvent,
    Request,
    Scheduler,
    SchedulerConfig,
    SchedulerInvariantError,
)


def make_model() -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)
    return DeepSeekMoEForCausalLM(tiny_config(512)).eval()


P1, P2 = [5, 9, 2, 7, 1, 3], [11, 4, 8]


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 10**30])
def test_a_seed_no_generator_takes_fails_that_request_alone(seed: int) -> None:
    """The critical bug of issue 19: the seed raised inside admission once the request had left the queue, so the
    step failed every request in flight, never answered this one, and leaked its blocks."""
    model = make_model()
    want = [generate(model, [p], max_new_tokens=8).new_tokens[0] for p in (P1, P2)]
    s = Scheduler(model, SchedulerConfig(max_batch_size=4, block_size=4, kv_cache_bytes=1 << 22))
    first = submit(s, P1, max_tokens=8)
    s.step()  # first is decoding when the bad request arrives
    bad = submit(s, [1, 2, 3], max_tokens=8, temperature=1.0, seed=seed)
    second = submit(s, P2, max_tokens=8)
    run_all(s)
    assert [first.tokens, second.tokens] == want
    assert first.finishes == [FinishEvent("length")] and second.finishes == [FinishEvent("length")]
    assert bad.tokens == [] and len(bad.finishes) == 1
    assert bad.finishes[0].reason == "invalid" and "seed" in (bad.finishes[0].error or "")
    assert s.pool.free_blocks == s.pool.capacity_blocks
    s.check_invariants()


def test_a_failure_after_blocks_are_taken_returns_them() -> None:
    """Any per-request set-up that raises (here: creating the generator, made to fail for one request) after
    the request owns blocks fails that request only and frees what it owned."""
    model = make_model()
    s = Scheduler(model, SchedulerConfig(max_batch_size=4, block_size=4, kv_cache_bytes=1 << 22))
    ok = submit(s, P1, max_tokens=5)
    bad = submit(s, P2, max_tokens=5, seed=3)
    setup = s._setup

    def broken(req: Request) -> None:
        setup(req)
        if req.params.seed == 3:
            assert req.table.blocks, "the request should own blocks by now"
            raise RuntimeError("set-up broke")

    s._setup = broken  # type: ignore[method-assign]
    run_all(s)
    assert ok.finishes == [FinishEvent("length")] and len(ok.tokens) == 5
    assert bad.finishes[0].reason == "error" and "set-up broke" in (bad.finishes[0].error or "")
    assert s.pool.free_blocks == s.pool.capacity_blocks


def test_the_invariant_check_fires_on_corrupted_ownership() -> None:
    model = make_model()
    for corrupt in ("leak", "share", "free-owned"):
        s = Scheduler(model, SchedulerConfig(max_batch_size=4, block_size=4, kv_cache_bytes=1 << 22))
        a = submit(s, P1, max_tokens=20)
        b = submit(s, P2, max_tokens=20)
        s.step()
        s.check_invariants()  # healthy so far
        ra, rb = s.running
        if corrupt == "leak":  # a block neither free nor owned
            ra.table.blocks.pop()
        elif corrupt == "share":  # one block owned twice
            rb.table.blocks.append(ra.table.blocks[0])
        else:  # an owned block also on the free list
            s.pool._free.append(ra.table.blocks[0])
        with pytest.raises(SchedulerInvariantError):
            s.step()  # the check runs at the end of every step
        # The threaded loop's answer to a broken invariant: fail everything in flight and start clean.
        s._recover(SchedulerInvariantError("test"))
        assert a.finishes[0].reason == "error" and b.finishes[0].reason == "error"
        assert s.pool.free_blocks == s.pool.capacity_blocks and not s.has_work()
        s.check_invariants()
        c = submit(s, P2, max_tokens=3)
        run_all(s)
        assert c.finishes == [FinishEvent("length")]


def test_a_failing_step_in_the_thread_answers_everyone_and_shutdown_does_not_hang() -> None:
    model = make_model()
    s = Scheduler(model, SchedulerConfig(max_batch_size=2, block_size=4, kv_cache_bytes=1 << 22))
    step = s.step
    calls = {"n": 0}

    def failing_step() -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("scheduler bug")
        step()

    s.step = failing_step  # type: ignore[method-assign]
    cs = [submit(s, P1, max_tokens=50), submit(s, P2, max_tokens=50), submit(s, [1, 2], max_tokens=50)]
    s.start()
    for c in cs:
        assert c.done.wait(timeout=60)
    # The two running requests fail; the one still queued owned no blocks and is served after recovery.
    assert [c.finishes[0].reason for c in cs] == ["error", "error", "length"]
    assert all(len(c.finishes) == 1 for c in cs)
    assert s.pool.free_blocks == s.pool.capacity_blocks
    after = submit(s, P2, max_tokens=2)  # still serving
    assert after.done.wait(timeout=60) and after.finishes == [FinishEvent("length")]
    slow = submit(s, P1, max_tokens=200)
    s.shutdown(timeout=0.0)
    assert len(slow.finishes) == 1 and slow.finishes[0].reason in ("length", "shutdown")
    assert not s.is_running


def test_over_http_a_bad_seed_is_a_400_while_a_stream_runs_on_and_sigterm_drains(tmp_path: Path) -> None:
    """The critical bug end to end: the long stream completes, the bad request gets a 400 naming ``seed``
    (whether the HTTP edge or the scheduler refuses it), no block stays in use, and SIGTERM exits."""
    ckpt = build_checkpoint(tmp_path / "tiny-ckpt")
    with running_server(ckpt, "--max-batch-size", "4", "--block-size", "8") as (url, proc):
        body = {"prompt": "import", "max_tokens": 120, "ignore_eos": True, "temperature": 0}
        want = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        streamed: list[str] = []

        def long_stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                streamed.extend(line for line in r.iter_lines() if line)

        t = threading.Thread(target=long_stream)
        t.start()
        for seed in (2**64, -2**63 - 1):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "def", "max_tokens": 5, "seed": seed},
                           timeout=60)
            assert r.status_code == 400, r.text
            assert "seed" in r.json()["error"]["message"]
        t.join(timeout=60)
        chunks = [json.loads(line[6:]) for line in streamed if line != "data: [DONE]"]
        assert streamed[-1] == "data: [DONE]"
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want
        metrics = httpx.get(f"{url}/metrics").text
        assert re.search(r"^deepseek_moe_kv_cache_blocks_used 0(\.0)?$", metrics, re.MULTILINE), metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
