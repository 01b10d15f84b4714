"""MTP drafting in the scheduler (serve/mtp_drafting.py): greedy rows give generate()'s plain greedy tokens alone
through chunked prefill, requests joining mid-flight, prefix-cache hits, preemption and n > 1 forks, for MTP
depths 1 and 2; and each request drafts exactly what generate() with the MTPDrafter drafts for it alone: the
same accepted and drafted counts, step for step, which holds only if the paged MTP entries are those of the
verified tokens (rolled back with the main cache on rejection, forked, restored after a prefix-cache match).
Every block returns to the pool; seeded sampling is reproducible and drafts with its own q; int8 models and LoRA
adapter rows draft with their own modules; a model without MTP is refused by name (the statistical check of
sampled output, through this scheduler, is tests/unit/test_speculative_mtp.py's, beside its helpers)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from mtp_models import echo_mtp_model
from scheduler_helpers import Collector, assert_busy_batch_matches_alone, run_all, submit
from serve_fixtures import free_port, tiny_config

from deepseek_moe import DeepSeekMoEForCausalLM, generate
from deepseek_moe.infer.draft import Draft
from deepseek_moe.infer.mtp_draft import MTPDrafter
from deepseek_moe.serve.scheduler import Request, SamplingParams, Scheduler, SchedulerConfig

K = 3  # drafted tokens per step


@pytest.fixture(scope="module", params=[1, 2])
def model(request: pytest.FixtureRequest) -> DeepSeekMoEForCausalLM:
    return echo_mtp_model(request.param)


def prompts(lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 512, (n,), generator=g).tolist() for n in lengths]


def mtp_config(**kw: object) -> SchedulerConfig:
    base: dict[str, object] = dict(speculative="mtp", num_draft_tokens=K, block_size=4, kv_cache_bytes=1 << 22)
    base.update(kw)
    return SchedulerConfig(**base)  # type: ignore[arg-type]


def alone(model: DeepSeekMoEForCausalLM, prompt: list[int], n: int) -> tuple[list[int], dict[str, float]]:
    """generate() with the MTPDrafter on ``prompt`` alone: its tokens and its speculative counts."""
    out = generate(model, [prompt], max_new_tokens=n, drafter=MTPDrafter(model), num_draft_tokens=K)
    assert out.speculative is not None
    return out.new_tokens[0], out.speculative.as_dict()


def test_busy_batch_gives_each_request_its_greedy_tokens_alone(model: DeepSeekMoEForCausalLM) -> None:
    ps = prompts((3, 40, 9, 70, 1, 25))
    s = assert_busy_batch_matches_alone(model, mtp_config(max_batch_size=4, max_batch_tokens=24), ps,
                                        [30, 12, 40, 16, 30, 20])
    m = s.metrics
    assert 0 < m.spec_accepted_tokens.value < m.spec_draft_tokens.value  # accepted and rolled-back drafts
    assert f"deepseek_moe_spec_draft_tokens_total {int(m.spec_draft_tokens.value)}" in m.render()


@pytest.mark.parametrize("max_batch_tokens", [128, 24])  # every prompt in one chunk; the 70-token one in four
def test_each_request_drafts_what_the_mtp_drafter_drafts_alone(model: DeepSeekMoEForCausalLM,
                                                                max_batch_tokens: int) -> None:
    ps = prompts((5, 17, 1, 30) if max_batch_tokens == 128 else (70,), seed=2)
    want = [alone(model, p, 24) for p in ps]
    s = Scheduler(model, mtp_config(max_batch_size=4, max_batch_tokens=max_batch_tokens))
    reqs = [s.submit(Request(p, SamplingParams(max_tokens=24), Collector())) for p in ps]
    run_all(s)
    for req, (tokens, stats) in zip(reqs, want, strict=True):
        assert req.sink.tokens == tokens  # type: ignore[attr-defined]
        assert req.speculative.as_dict() == stats
        assert 0 < stats["accepted"] < stats["drafted"]
    assert s.pool.free_blocks == s.pool.capacity_blocks


def record_drafts(s: Scheduler) -> list[Draft]:
    """Every non-empty draft ``s`` draws from now on, in order."""
    assert s.mtp is not None
    log: list[Draft] = []
    draft = s.mtp.draft

    def recording(reqs: Sequence[Request], ks: Sequence[int]) -> list[Draft]:
        out = draft(reqs, ks)
        log.extend(d for d in out if d.tokens)
        return out

    s.mtp.draft = recording  # type: ignore[method-assign]
    return log


def test_a_prefix_cache_hit_drafts_as_if_it_had_computed_the_prefix(model: DeepSeekMoEForCausalLM) -> None:
    """The second request takes the first's blocks, MTP entries included, and resumes the MTP chain from the
    hidden states its last matched block stashed: greedy, the MTPDrafter's counts; sampled, the very draft
    distributions of a scheduler that computes the whole prompt (no prefix cache)."""
    first, other = prompts((22, 3), seed=3)
    second = first[:20] + other  # 5 shared blocks of 4
    s = Scheduler(model, mtp_config())
    submit(s, first, max_tokens=16)
    run_all(s)
    for p in (second, first):  # a block-aligned hit, then the whole prompt but its last token
        hits = s.metrics.prefix_cache_hits.value
        req = s.submit(Request(p, SamplingParams(max_tokens=24), Collector()))
        run_all(s)
        assert s.metrics.prefix_cache_hits.value - hits == 20
        tokens, stats = alone(model, p, 24)
        assert req.sink.tokens == tokens  # type: ignore[attr-defined]
        assert req.speculative.as_dict() == stats

        computed = Scheduler(model, mtp_config(prefix_cache=False))
        runs = []
        for sched in (s, computed):
            log = record_drafts(sched)
            c = submit(sched, p, max_tokens=12, temperature=1.0, seed=7)
            run_all(sched)
            runs.append((c.tokens, log))
        assert runs[0][0] == runs[1][0]
        assert len(runs[0][1]) == len(runs[1][1]) > 0
        for hit, full in zip(runs[0][1], runs[1][1], strict=True):
            assert hit.tokens == full.tokens and hit.q is not None and full.q is not None
            torch.testing.assert_close(hit.q, full.q, rtol=0, atol=1e-9)
    assert s.pool.free_blocks == s.pool.capacity_blocks


@pytest.mark.parametrize("prefix_cache", [False, True])  # recomputed; or resuming from its own cached blocks
def test_preempted_requests_give_their_greedy_tokens(model: DeepSeekMoEForCausalLM, prefix_cache: bool) -> None:
    ps = prompts((5, 9, 3, 7, 6), seed=4)
    greedy = [generate(model, [p], max_new_tokens=20).new_tokens[0] for p in ps]
    per_token = Scheduler(model, mtp_config()).bytes_per_token
    s = Scheduler(model, mtp_config(kv_cache_bytes=13 * 4 * per_token, max_batch_size=8, max_batch_tokens=16,
                                    prefix_cache=prefix_cache))
    out = [submit(s, p, max_tokens=20) for p in ps]
    run_all(s)
    assert s.preemptions > 0
    assert 0 < s.metrics.spec_accepted_tokens.value < s.metrics.spec_draft_tokens.value
    assert [c.tokens for c in out] == greedy
    assert s.pool.free_blocks == s.pool.capacity_blocks


@pytest.mark.parametrize("n_prompt", [8, 10])  # block-aligned, and a partly filled last block (copied)
def test_forked_choices_draft_from_their_shared_prompt(model: DeepSeekMoEForCausalLM, n_prompt: int) -> None:
    p = prompts((n_prompt,), seed=5)[0]
    tokens, stats = alone(model, p, 20)
    s = Scheduler(model, mtp_config(max_batch_size=4))
    reqs = [Request(p, SamplingParams(max_tokens=20), Collector()) for _ in range(3)]
    s.submit(reqs[0], forks=reqs[1:])
    run_all(s)
    for req in reqs:
        assert req.sink.tokens == tokens  # type: ignore[attr-defined]
        assert req.speculative.as_dict() == stats
    assert s.pool.free_blocks == s.pool.capacity_blocks and s.pool.audit([]) == []


def test_seeded_sampling_is_reproducible_and_drafts_from_its_own_distribution() -> None:
    model = echo_mtp_model(1)
    ps = prompts((6, 11), seed=6)
    runs = []
    for _ in range(2):
        s = Scheduler(model, mtp_config())
        drafts = record_drafts(s)
        out = [submit(s, p, max_tokens=20, temperature=1.0, seed=i) for i, p in enumerate(ps)]
        run_all(s)
        assert drafts and all(d.q is not None and d.q.shape == (len(d.tokens), 512) for d in drafts)  # their q
        assert s.metrics.spec_draft_tokens.value > 0
        runs.append([c.tokens for c in out])
    assert runs[0] == runs[1]
    assert all(len(t) == 20 for t in runs[0])


def test_draft_room_skips_grammar_rows_and_keeps_within_budget_and_limits() -> None:
    """Whichever drafter: a row with a grammar drafts nothing (its logits are masked position by position), the
    others at most num_draft_tokens, the step's budget, and what max_tokens leaves after the verified token."""
    from deepseek_moe.serve.drafting import draft_room

    req = Request([1, 2, 3], SamplingParams(max_tokens=10), Collector())
    req.output = [4, 5]
    assert draft_room(req, budget=100, num_draft_tokens=4, capacity=1000) == 4
    assert draft_room(req, budget=2, num_draft_tokens=4, capacity=1000) == 2
    req.output = [4] * 7  # 3 tokens left: the verification's own and 2 drafted
    assert draft_room(req, budget=100, num_draft_tokens=4, capacity=1000) == 2
    assert draft_room(req, budget=100, num_draft_tokens=4, capacity=11) == 1  # 10 held, 1 slot left to draft
    req.constraint = object()  # type: ignore[assignment]
    assert draft_room(req, budget=100, num_draft_tokens=4, capacity=1000) == 0


def test_a_model_without_mtp_is_refused() -> None:
    plain = DeepSeekMoEForCausalLM(tiny_config(64), init_seed=0)
    with pytest.raises(ValueError, match="mtp_depth 0.*speculative"):
        Scheduler(plain, mtp_config())
    with pytest.raises(ValueError, match="speculative \\('eagle'\\) must be 'ngram', 'mtp' or None"):
        SchedulerConfig(speculative="eagle")  # type: ignore[arg-type]


def test_serve_refuses_mtp_drafting_for_a_checkpoint_without_mtp(tmp_path: Path) -> None:
    import subprocess
    import sys

    from deepseek_moe import save_pretrained
    from deepseek_moe.train.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["some text to train on"] * 5, 300)
    model = DeepSeekMoEForCausalLM(tiny_config(tokenizer.get_vocab_size()), init_seed=0)
    model.tokenizer = tokenizer
    save_pretrained(model, tmp_path / "plain")
    # Refused before it binds a port or loads a tensor (a child process: were it to serve, it is killed).
    cmd = [sys.executable, "-m", "deepseek_moe.cli.main", "serve", str(tmp_path / "plain"), "--port",
           str(free_port()), "--speculative", "mtp"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--speculative mtp" in done.stderr and "mtp_depth 0" in done.stderr, done.stderr


def test_an_int8_model_drafts_and_verifies_with_its_own_kernels() -> None:
    """Quantised and speculative compose: the int8 model's MTP block and main layers run their quantised
    kernels in the scheduler, with generate()'s tokens and MTPDrafter counts."""
    from deepseek_moe.quant import QuantConfig, quantize_model

    model = quantize_model(echo_mtp_model(1, dtype=torch.float32), QuantConfig(bits=8))
    assert type(model.mtp[0].block.ffn.experts).__name__ == "QuantRoutedExperts"
    ps = prompts((9, 20), seed=7)
    want = [alone(model, p, 20) for p in ps]
    s = Scheduler(model, mtp_config(max_batch_size=4, max_batch_tokens=64))
    reqs = [s.submit(Request(p, SamplingParams(max_tokens=20), Collector())) for p in ps]
    run_all(s)
    for req, (tokens, stats) in zip(reqs, want, strict=True):
        assert req.sink.tokens == tokens  # type: ignore[attr-defined]
        assert req.speculative.as_dict() == stats
    assert s.metrics.spec_accepted_tokens.value > 0


def test_adapter_rows_draft_with_their_own_model(tmp_path: Path) -> None:
    """A LoRA adapter's rows run its model's MTP modules (and their blocks share the pool but not the prefix
    cache): each row gives the tokens and MTPDrafter counts of generate() on that model alone."""
    import copy

    from deepseek_moe.adapters import LoRAConfig, apply_lora
    from deepseek_moe.adapters.peft import save_adapter
    from deepseek_moe.serve.adapters import load_adapters

    model = echo_mtp_model(1)
    adapted = copy.deepcopy(model)
    torch.manual_seed(1)
    cfg = LoRAConfig(r=2, alpha=8.0, targets=("attention", "shared_experts", "routed_experts"), init="random")
    apply_lora(adapted, cfg)
    with torch.no_grad():  # an adapter strong enough to change the sharpened model's greedy tokens
        for name, param in adapted.named_parameters():
            if "lora" in name:
                param.mul_(10.0)
    path = save_adapter(adapted, tmp_path / "a", cfg)
    p = prompts((13,), seed=8)[0]
    rows = [("a", adapted.eval()), (None, model)]
    want = [alone(m, p, 16) for _, m in rows]
    assert want[0][0] != want[1][0]  # the adapter changes the output
    s = Scheduler(model, mtp_config(max_batch_size=4, max_batch_tokens=64),
                  adapters=load_adapters(model, [("a", path)]))
    reqs = [s.submit(Request(p, SamplingParams(max_tokens=16), Collector(), adapter=k)) for k, _ in rows]
    run_all(s)
    for req, (tokens, stats) in zip(reqs, want, strict=True):
        assert req.sink.tokens == tokens  # type: ignore[attr-defined]
        assert req.speculative.as_dict() == stats


def test_serve_drafts_with_mtp_over_http(tmp_path: Path) -> None:
    """``deepseek-moe serve CKPT --speculative mtp`` on a checkpoint saved with its MTP module: greedy completions
    are generate()'s, and /metrics counts the drafts."""
    import httpx
    from serve_fixtures import TEXTS, running_server

    from deepseek_moe import from_pretrained, save_pretrained
    from deepseek_moe.train.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(TEXTS, 400)
    model = echo_mtp_model(1, vocab_size=tokenizer.get_vocab_size(), dtype=torch.float32)
    model.tokenizer = tokenizer
    save_pretrained(model, tmp_path / "mtp")
    loaded = from_pretrained(tmp_path / "mtp").eval()
    assert len(loaded.mtp) == 1
    prompt = "def add(a, b):\n    return"
    ids = tokenizer.encode(prompt).ids
    want = generate(loaded, [ids], max_new_tokens=16, stop_tokens=[0]).new_tokens[0]
    want_text = tokenizer.decode([t for t in want if t != 0])
    flags = ("--speculative", "mtp", "--num-draft-tokens", "3", "--block-size", "4")
    with running_server(tmp_path / "mtp", *flags) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 16,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        # The server holds back a last character whose UTF-8 bytes are not all out yet; decode() shows it as U+FFFD.
        assert body["choices"][0]["text"] == want_text.removesuffix("\ufffd")
        assert body["usage"]["completion_tokens"] == len(want)
        text = httpx.get(f"{url}/metrics").text
    drafted = re.search(r"^deepseek_moe_spec_draft_tokens_total (\S+)$", text, re.MULTILINE)
    assert drafted is not None and float(drafted.group(1)) > 0
