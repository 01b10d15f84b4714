"""logprobs / top_logprobs (issue 24): each generated token's log-probability and its most likely alternatives
equal log_softmax of the model's logits at that position, computed here by one plain full forward over prompt +
output in float32, through the scheduler (batched with rows that did not ask, chunked prefill, preemption,
speculative decoding, a grammar mask) and through a real server (completions and chat, streamed and not)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from scheduler_helpers import Collector, run_all, submit
from serve_fixtures import build_checkpoint, running_server, tiny_config

from deepseek_moe import DeepSeekMoEForCausalLM, from_pretrained
from deepseek_moe.serve.scheduler import Request, SamplingParams, Scheduler, SchedulerConfig, TokenEvent
from deepseek_moe.serve.structured import Constraint
from deepseek_moe.serve.text import ChatTemplate

VOCAB = 300
TOL = 1e-5


@pytest.fixture(scope="module")
def model() -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)
    m = DeepSeekMoEForCausalLM(tiny_config(VOCAB)).eval()
    with torch.no_grad():
        m.head.weight.mul_(20.0)  # sharp: greedy and top-k orders far from ties
    return m


def reference(model: DeepSeekMoEForCausalLM, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log_softmax of the logits that chose each output token: (len(output), V), one full forward in float32."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:len(prompt) + len(output) - 1], dim=-1)


def check_events(model: DeepSeekMoEForCausalLM, prompt: list[int], c: Collector, k: int | None) -> None:
    events = [e for e in c.events if isinstance(e, TokenEvent)]
    assert events and c.finish is not None and c.finish.reason in ("stop", "length"), c.events
    if k is None:  # rows that did not ask get nothing
        assert all(e.logprob is None and e.top_logprobs == () for e in events)
        return
    ref = reference(model, prompt, [e.token for e in events])
    for n, e in enumerate(events):
        assert e.logprob is not None and abs(e.logprob - ref[n, e.token].item()) < TOL, (n, e.logprob)
        values, ids = ref[n].topk(k)
        assert [t for t, _ in e.top_logprobs] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in e.top_logprobs]), values, atol=TOL, rtol=0)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


CONFIGS: dict[str, SchedulerConfig | None] = {
    "default": SchedulerConfig(max_batch_size=8, block_size=4),
    "chunked prefill": SchedulerConfig(max_batch_size=8, max_batch_tokens=8, block_size=4),
    "preemption": None,  # sized to the model below
    "speculative": SchedulerConfig(max_batch_size=8, block_size=4, speculative="ngram"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scheduler_logprobs_equal_a_full_forward(model: DeepSeekMoEForCausalLM, name: str) -> None:
    config = CONFIGS[name]
    if config is None:  # room for about two requests' tokens: the batch must preempt and recompute
        from deepseek_moe.model.counting import kv_cache_bytes_per_token
        config = SchedulerConfig(max_batch_size=8, max_batch_tokens=16, block_size=4,
                                 kv_cache_bytes=kv_cache_bytes_per_token(model.config, torch.float32) * 4 * 14)
    s = Scheduler(model, config)
    # Repeating prompts so that the ngram drafter drafts (and some drafts are accepted).
    cases = [(prompt(5, 1) * 3, None, {}), (prompt(9, 2), 0, {}), (prompt(3, 3) * 4, 5, {}),
             (prompt(12, 4), 20, {}), (prompt(7, 5), 3, {"temperature": 0.9, "top_p": 0.8, "seed": 7}),
             (prompt(6, 6), 2, {"temperature": 1.5, "top_k": 5, "seed": 3})]
    collectors = [submit(s, p, max_tokens=12, logprobs=k, **extra) for p, k, extra in cases]
    run_all(s)
    if name == "preemption":
        assert s.preemptions > 0
    if name == "speculative":
        assert s.metrics.spec_accepted_tokens.value > 0
    for (p, k, _), c in zip(cases, collectors, strict=True):
        check_events(model, p, c, k)


def check_prompt_logprobs(model: DeepSeekMoEForCausalLM, p: list[int], got: list[Any], k: int) -> None:
    """Entry j is prompt token j + 1's log-probability and top k, from the logits at position j."""
    ref = reference(model, p[:1], p[1:])  # positions 0 .. P-2
    assert len(got) == len(p) - 1
    for j, (logprob, top) in enumerate(got):
        assert abs(logprob - ref[j, p[j + 1]].item()) < TOL, j
        values, ids = ref[j].topk(k)
        assert [t for t, _ in top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in top]), values, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["default", "chunked prefill", "preemption"])
def test_scheduler_prompt_logprobs_equal_a_full_forward(model: DeepSeekMoEForCausalLM, name: str) -> None:
    """echo's prompt logprobs: every prompt position, also where the prefix cache holds the prompt's blocks (a
    request that wants them computes its prompt), across prefill chunks and a preemption; copied to n > 1 forks;
    max_tokens 0 ends after the prompt without a token."""
    config = CONFIGS[name]
    if config is None:
        from deepseek_moe.model.counting import kv_cache_bytes_per_token
        config = SchedulerConfig(max_batch_size=8, max_batch_tokens=16, block_size=4,
                                 kv_cache_bytes=kv_cache_bytes_per_token(model.config, torch.float32) * 4 * 14)
    s = Scheduler(model, config)
    shared = prompt(12, 11)
    submit(s, shared + [5], max_tokens=2)
    run_all(s)  # caches the shared blocks
    cases = [(shared + prompt(6, 12), 3, 6), (prompt(9, 13), 0, 0), (prompt(20, 14), 5, 10), (shared, 2, 3)]
    sinks = [Collector() for _ in cases]
    reqs = [Request(p, SamplingParams(max_tokens=m, prompt_logprobs=k, ignore_eos=True), c)
            for (p, k, m), c in zip(cases, sinks, strict=True)]
    fork_sinks = [Collector(), Collector()]
    forks = [Request(cases[0][0], reqs[0].params, c) for c in fork_sinks]
    s.submit(reqs[0], forks=forks)
    for r in reqs[1:]:
        s.submit(r)
    others = [submit(s, prompt(7 + i, 20 + i), max_tokens=8) for i in range(3)]  # rows that did not ask
    run_all(s)
    if name == "preemption":
        assert s.preemptions > 0
    for (p, k, m), r, c in zip(cases, reqs, sinks, strict=True):
        assert c.finish is not None and c.finish.reason == "length" and len(c.tokens) == m
        check_prompt_logprobs(model, p, r.prompt_logprobs, k)
    assert all(f.prompt_logprobs == reqs[0].prompt_logprobs for f in forks)
    assert all(len(c.tokens) == 6 for c in fork_sinks)
    assert all(o.finish is not None and o.finish.reason in ("stop", "length") for o in others)
    assert s.pool.free_blocks == s.pool.capacity_blocks


class EvenTokens(Constraint):
    """A grammar stand-in that allows only even token ids (bit i of word i // 32 set: token i allowed)."""

    def __init__(self) -> None:
        self.consumed: list[int] = []

    def fill(self, bitmask_W: torch.Tensor) -> None:
        bitmask_W.fill_(0x55555555)

    def consume(self, token: int) -> None:
        assert token % 2 == 0
        self.consumed.append(token)

    @property
    def finished(self) -> bool:
        return False


def test_logprobs_are_of_the_unmasked_distribution(model: DeepSeekMoEForCausalLM) -> None:
    """A grammar chooses the token; the reported distribution is the model's, not the masked one (whose
    renormalized values would differ by log of the allowed mass, and would put -inf on disallowed tokens)."""
    s = Scheduler(model, SchedulerConfig(block_size=4))
    p = prompt(8, 9)
    c, plain = Collector(), Collector()
    s.submit(Request(p, SamplingParams(max_tokens=10, logprobs=4), c, constraint=EvenTokens()))
    s.submit(Request(p, SamplingParams(max_tokens=10, logprobs=4), plain))  # same prompt, unconstrained, one batch
    run_all(s)
    assert all(t % 2 == 0 for t in c.tokens) and any(t % 2 for t in plain.tokens)
    check_events(model, p, c, 4)
    check_events(model, p, plain, 4)
    ref = reference(model, p, c.tokens)
    masked = torch.log_softmax(ref.masked_fill(torch.arange(VOCAB) % 2 == 1, -torch.inf), dim=-1)
    assert (masked - ref).max() > 1e-3  # the test tells the two distributions apart


def test_sampling_params_refuse_out_of_range_logprobs() -> None:
    for bad in (-1, 21):
        with pytest.raises(ValueError, match="logprobs"):
            SamplingParams(logprobs=bad)


# --- through a real server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    ckpt = build_checkpoint(tmp_path_factory.mktemp("logprobs") / "tiny-ckpt")
    with running_server(ckpt, "--max-batch-size", "4", "--block-size", "8") as (url, _):
        yield url, ckpt


@pytest.fixture(scope="module")
def client(served: tuple[str, Path]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def loaded(served: tuple[str, Path]) -> DeepSeekMoEForCausalLM:
    return from_pretrained(served[1]).float().eval()


def greedy_reference(model: DeepSeekMoEForCausalLM, ids: list[int], n: int, k: int) -> list[dict[str, Any]]:
    """What greedy decoding of ``n`` tokens emits, with each token's log-probability and its top ``k`` (ids and
    values), from full forwards: the token texts are the tokenizer's decoding of each id alone."""
    def decode(token: int) -> str:
        return str(model.tokenizer.decode([token], skip_special_tokens=False))
    out: list[int] = []
    for _ in range(n):
        with torch.inference_mode():
            out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    ref = reference(model, ids, out)
    rows = []
    for i, token in enumerate(out):
        values, top = ref[i].topk(k)
        rows.append({"token": decode(token), "logprob": ref[i, token].item(),
                     "top": [(decode(t), v) for t, v in zip(top.tolist(), values.tolist(), strict=True)]})
    return rows


def sse(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def close(a: float, b: float) -> bool:
    return abs(a - b) < TOL


def test_completions_logprobs_streamed_and_not(served: tuple[str, Path], client: openai.OpenAI,
                                               loaded: DeepSeekMoEForCausalLM) -> None:
    url, _ = served
    ids = loaded.tokenizer.encode("The quick brown", add_special_tokens=True).ids
    ref = greedy_reference(loaded, ids, 8, 3)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens == [x["token"] for x in ref]
    assert lp.token_logprobs is not None and all(close(a, x["logprob"]) for a, x in zip(lp.token_logprobs, ref,
                                                                                         strict=True))
    assert lp.top_logprobs is not None
    for got, x in zip(lp.top_logprobs, ref, strict=True):  # top-k plus the chosen token, by text
        want = {**dict(x["top"]), x["token"]: x["logprob"]}
        assert got.keys() == want.keys() and all(close(got[t], want[t]) for t in want)
    # Streamed: the same values, one token per chunk, offsets counted across the chunks: where each chunk's
    # text starts in the whole text (a token that ends inside a character has its text held back, so offsets
    # are not the lengths of the tokens' own texts).
    chunks = sse(url, "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 8, "temperature": 0,
                                          "logprobs": 3, "stream": True, "ignore_eos": True})
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for key, values in chunk["choices"][0]["logprobs"].items():
            streamed[key] += values
    assert streamed["tokens"] == lp.tokens and streamed["text_offset"] == lp.text_offset
    texts = [chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"][0]["logprobs"]["tokens"]]
    assert lp.text_offset == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == r.choices[0].text
    assert all(close(a, b) for a, b in zip(streamed["token_logprobs"], lp.token_logprobs, strict=True))
    # logprobs 0: the chosen token alone; no logprobs: null.
    zero = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0, logprobs=0)
    assert zero.choices[0].logprobs is not None
    assert zero.choices[0].logprobs.top_logprobs == [{x["token"]: pytest.approx(x["logprob"], abs=TOL)}
                                                     for x in ref[:3]]
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=3).choices[0].logprobs is None


def test_completions_echo_streamed_and_not(served: tuple[str, Path], client: openai.OpenAI,
                                           loaded: DeepSeekMoEForCausalLM) -> None:
    """echo: the prompt's text before the completion's, and with logprobs the prompt tokens' first (the first
    null, as OpenAI's), equal to log_softmax of a full forward; max_tokens 0 scores the prompt alone."""
    url, _ = served
    text = "The quick brown fox"
    ids = loaded.tokenizer.encode(text, add_special_tokens=True).ids
    plain = client.completions.create(model="tiny", prompt=text, max_tokens=5, temperature=0, logprobs=2,
                                      extra_body={"ignore_eos": True})
    r = client.completions.create(model="tiny", prompt=text, max_tokens=5, temperature=0, logprobs=2, echo=True,
                                  extra_body={"ignore_eos": True})
    got, want = r.choices[0], plain.choices[0]
    assert got.text == text + want.text
    lp, lp_plain = got.logprobs, want.logprobs
    assert lp is not None and lp_plain is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None and lp_plain.text_offset is not None
    P = len(ids)
    decode = [str(loaded.tokenizer.decode([t], skip_special_tokens=False)) for t in ids]
    assert lp.tokens == decode + lp_plain.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference(loaded, ids[:1], ids[1:])
    for j in range(1, P):
        assert close(lp.token_logprobs[j], ref[j - 1, ids[j]].item()), j
        values, top = ref[j - 1].topk(2)
        want_top = {decode_one: v for decode_one, v in zip(
            [str(loaded.tokenizer.decode([t], skip_special_tokens=False)) for t in top.tolist()], values.tolist(),
            strict=True)}
        want_top[decode[j]] = ref[j - 1, ids[j]].item()
        assert lp.top_logprobs[j].keys() == want_top.keys()
    assert lp.token_logprobs[P:] == pytest.approx(lp_plain.token_logprobs, abs=TOL)
    assert lp.text_offset[0] == 0 and lp.text_offset[P:] == [len(text) + o for o in lp_plain.text_offset]
    # Streamed: the prompt comes first, as one chunk with its logprobs; the whole is the same.
    chunks = sse(url, "/v1/completions", {"model": "tiny", "prompt": text, "max_tokens": 5, "temperature": 0,
                                          "logprobs": 2, "echo": True, "stream": True, "ignore_eos": True})
    assert chunks[0]["choices"][0]["text"] == text and len(chunks[0]["choices"][0]["logprobs"]["tokens"]) == P
    assert "".join(c["choices"][0]["text"] for c in chunks) == got.text
    assert [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]] == lp.tokens
    # max_tokens 0: the prompt scored, nothing generated; echo without logprobs: text only.
    score = client.completions.create(model="tiny", prompt=text, max_tokens=0, logprobs=0, echo=True, n=2)
    assert [c.text for c in score.choices] == [text] * 2 and score.choices[1].finish_reason == "length"
    assert score.usage is not None and score.usage.completion_tokens == 0
    for c in score.choices:  # the forks, which never ran, report their request's prompt logprobs
        assert c.logprobs is not None and c.logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:P], abs=TOL)
    bare = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0, echo=True, n=2,
                                     extra_body={"ignore_eos": True})
    assert [c.text for c in bare.choices] == [text + want.text] * 2 and bare.choices[0].logprobs is None


def test_chat_logprobs_streamed_and_not(served: tuple[str, Path], client: openai.OpenAI,
                                        loaded: DeepSeekMoEForCausalLM) -> None:
    url, ckpt = served
    messages = [{"role": "user", "content": "def add"}]
    text = ChatTemplate.for_checkpoint(ckpt).render(messages)
    ids = loaded.tokenizer.encode(text, add_special_tokens=False).ids
    ref = greedy_reference(loaded, ids, 6, 4)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=4, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and [c.token for c in content] == [x["token"] for x in ref]
    for c, x in zip(content, ref, strict=True):
        assert close(c.logprob, x["logprob"])
        assert [t.token for t in c.top_logprobs] == [t for t, _ in x["top"]]
        assert all(close(t.logprob, v) for t, (_, v) in zip(c.top_logprobs, x["top"], strict=True))
        # Each token's own bytes, also for part of a character (whose text alone is U+FFFD).
        assert all(t.bytes is not None and bytes(t.bytes).decode(errors="replace") == t.token
                   for t in c.top_logprobs)
    # The tokens' bytes, joined, are the reply's text (the tiny random model often ends tokens mid-character;
    # the detokenizer drops invalid bytes at the reply's end, where it cannot tell them from an unfinished one).
    joined = b"".join(bytes(c.bytes or []) for c in content).decode(errors="replace")
    assert joined.rstrip("\ufffd") == (r.choices[0].message.content or "").rstrip("\ufffd")
    chunks = sse(url, "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 6,
                                               "temperature": 0, "logprobs": True, "top_logprobs": 4,
                                               "stream": True, "ignore_eos": True})
    streamed = [e for ch in chunks if ch["choices"] and ch["choices"][0]["logprobs"]
                for e in ch["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [c.token for c in content]
    assert all(close(e["logprob"], c.logprob) for e, c in zip(streamed, content, strict=True))
    assert all([t["token"] for t in e["top_logprobs"]] == [t.token for t in c.top_logprobs]
               for e, c in zip(streamed, content, strict=True))
    # logprobs without top_logprobs: the chosen tokens, no alternatives.
    bare = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0,
                                          logprobs=True)
    assert bare.choices[0].logprobs is not None and bare.choices[0].logprobs.content is not None
    assert [c.top_logprobs for c in bare.choices[0].logprobs.content] == [[], []]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"logprobs": 2, "echo": 1}, "echo"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),  # 0 only with echo
])
def test_bad_logprobs_values_are_400s_naming_the_field(served: tuple[str, Path], path: str, body: dict[str, Any],
                                                       param: str) -> None:
    base = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    r = httpx.post(f"{served[0]}{path}", json={**base, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]
