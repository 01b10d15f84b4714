"""A real ``deepseek-moe serve`` process on a loopback port, driven by httpx and the official openai client."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from serve_fixtures import build_checkpoint, free_port, running_server, tiny_config

CONTEXT = 256


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ckpt = build_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-ckpt")
    with running_server(ckpt, "--max-batch-size", "4", "--max-batch-tokens", "64", "--max-queue", "8",
                        "--block-size", "8") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def complete(url: str, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "temperature": 0, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(url: str, path: str, body: dict[str, Any]) -> list[Any]:
    """The ``data:`` payloads of a streamed response, JSON-decoded ('[DONE]' kept as the string)."""
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [p if p == "[DONE]" else json.loads(p) for p in (line[6:] for line in lines)]


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics").text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_health_models_and_metrics(server: str) -> None:
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    models = httpx.get(f"{server}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    complete(server, prompt="def add", max_tokens=4)
    r = httpx.get(f"{server}/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("requests_received_total", "prompt_tokens_total", "generation_tokens_total", "queue_depth",
                 "running_batch_size", "kv_cache_occupancy_ratio", "kv_cache_blocks_used",
                 "time_to_first_token_seconds_bucket", "time_per_output_token_seconds_count"):
        assert f"deepseek_moe_{name}" in text, name
    assert metric(server, "deepseek_moe_time_to_first_token_seconds_count") >= 1
    # Expert load per MoE layer (layers 1 and 2 of the tiny test model), top-2: every token counted twice.
    loads = {layer: sum(float(v) for v in re.findall(
        rf'^deepseek_moe_expert_tokens_total{{layer="{layer}",expert="\d+"}} (\S+)$', text, re.MULTILINE))
        for layer in (1, 2)}
    assert loads[1] == loads[2] > 0 and loads[1] % 2 == 0


def test_completion_with_httpx_and_the_openai_client(server: str, client: openai.OpenAI) -> None:
    raw = complete(server, prompt="The quick brown", max_tokens=12, ignore_eos=True)
    assert raw["object"] == "text_completion" and raw["model"] == "tiny"
    assert raw["choices"][0]["finish_reason"] == "length"
    prompt_tokens = raw["usage"]["prompt_tokens"]
    assert raw["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 12,
                            "total_tokens": prompt_tokens + 12}
    via_openai = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert via_openai.choices[0].text == raw["choices"][0]["text"]
    assert via_openai.usage is not None and via_openai.usage.completion_tokens == 12


def test_streaming_sends_one_chunk_per_token_then_done(server: str, client: openai.OpenAI) -> None:
    body = {"model": "tiny", "prompt": "import torch", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    whole = complete(server, **{k: v for k, v in body.items() if k != "model"})
    events = sse_events(server, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) == 10 + 1  # a chunk per token, then the one that says why it finished
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert not any("usage" in c for c in chunks)  # OpenAI: no usage unless include_usage asks for it
    stream = client.completions.create(model="tiny", prompt="import torch", max_tokens=10, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    parts, usage = [], None
    for chunk in stream:
        parts += [c.text for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(parts) == whole["choices"][0]["text"]
    assert usage is not None and usage.completion_tokens == 10


def test_stream_usage_comes_once_with_include_usage_and_on_every_chunk_with_continuous_stats(server: str) -> None:
    body = {"prompt": "import torch", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    events = sse_events(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    with_usage = [e for e in events[:-1] if e.get("usage")]
    assert len(with_usage) == 1 and with_usage[0] is events[-2] and with_usage[0]["choices"] == []
    prompt = with_usage[0]["usage"]["prompt_tokens"]
    assert with_usage[0]["usage"] == {"prompt_tokens": prompt, "completion_tokens": 6, "total_tokens": prompt + 6}
    chat = {**{k: v for k, v in body.items() if k != "prompt"}, "messages": [{"role": "user", "content": "hi"}]}
    events = sse_events(server, "/v1/chat/completions", {**chat, "stream_options": {"continuous_usage_stats": True}})
    chunks = events[:-1]
    assert len(chunks) == 1 + 6 + 1  # the role, a chunk per token, the finish
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 3, 4, 5, 6, 6]
    events = sse_events(server, "/v1/chat/completions", {**chat, "stream_options": {"continuous_usage_stats": True,
                                                                                    "include_usage": True}})
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 6
    assert all(e["usage"]["completion_tokens"] <= 6 for e in events[:-1])


def test_chat_uses_the_default_template_streaming_or_not(server: str, client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,  # type: ignore[arg-type]
                                          temperature=0, extra_body={"ignore_eos": True})
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    # The documented plain default: "Role: content" blocks, then "Assistant:".
    same = complete(server, prompt="System: Be brief.\n\nUser: hello\n\nAssistant:", max_tokens=8,
                    ignore_eos=True)
    assert chat.choices[0].message.content == same["choices"][0]["text"]
    assert chat.usage is not None and chat.usage.prompt_tokens == same["usage"]["prompt_tokens"]
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,  # type: ignore[arg-type]
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_cut_the_text(server: str) -> None:
    finished = {r: metric(server, "deepseek_moe_requests_finished_total", f'{{reason="{r}"}}')
                for r in ("stop", "cancelled")}
    full = complete(server, prompt="The quick brown fox", max_tokens=30, ignore_eos=True)["choices"][0]["text"]
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip() and
                "\ufffd" not in full[i:i + 2])
    cut = full[:full.index(stop)]
    out = complete(server, prompt="The quick brown fox", max_tokens=30, ignore_eos=True, stop=[stop, "zzzz"])
    assert out["choices"][0]["text"] == cut and out["choices"][0]["finish_reason"] == "stop"
    events = sse_events(server, "/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 30,
                                                     "temperature": 0, "ignore_eos": True, "stop": stop})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    # Both count as stopped in /metrics, not as cancelled (the scheduler retires them when the app sees the stop).
    deadline = time.monotonic() + 10
    while metric(server, "deepseek_moe_requests_finished_total", '{reason="stop"}') < finished["stop"] + 2:
        assert time.monotonic() < deadline, "the stop-string finishes were not counted as stop"
        time.sleep(0.05)
    assert metric(server, "deepseek_moe_requests_finished_total", '{reason="cancelled"}') == finished["cancelled"]


def test_n_choices_streamed_or_not(server: str, client: openai.OpenAI) -> None:
    """n > 1: choices indexed 0..n-1 in the body and in the chunks; greedy choices equal n = 1's; with a seed,
    choice i is the n = 1 request seeded seed + i (docs/serving.md), streamed or not; usage counts the prompt
    once and every choice's tokens."""
    one = complete(server, prompt="The quick", max_tokens=6, ignore_eos=True)
    three = complete(server, prompt="The quick", max_tokens=6, ignore_eos=True, n=3)
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert [c["text"] for c in three["choices"]] == [one["choices"][0]["text"]] * 3
    assert three["usage"] == {"prompt_tokens": one["usage"]["prompt_tokens"], "completion_tokens": 18,
                              "total_tokens": one["usage"]["prompt_tokens"] + 18}

    messages = [{"role": "user", "content": "héllo"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 5, "temperature": 1.0, "seed": 11, "n": 2,
            "ignore_eos": True}
    whole = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    for i, c in enumerate(whole["choices"]):
        alone = httpx.post(f"{server}/v1/chat/completions", json={**body, "n": 1, "seed": 11 + i}, timeout=60).json()
        assert c["message"]["content"] == alone["choices"][0]["message"]["content"]
    events = sse_events(server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    assert events[-2]["usage"] == whole["usage"] and whole["usage"]["completion_tokens"] == 10
    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, str] = {}
    for e in events[:-2]:
        assert len(e["choices"]) == 1 and e["id"] == events[0]["id"]
        c = e["choices"][0]
        texts[c["index"]] += c["delta"].get("content", "")
        if c["finish_reason"]:
            finishes[c["index"]] = c["finish_reason"]
    assert texts == {i: c["message"]["content"] for i, c in enumerate(whole["choices"])}
    assert finishes == {0: "length", 1: "length"}
    got = client.completions.create(model="tiny", prompt="The quick", max_tokens=6, temperature=0, n=2,
                                    extra_body={"ignore_eos": True})
    assert [c.text for c in got.choices] == [one["choices"][0]["text"]] * 2


def test_concurrent_requests_get_what_they_get_alone(server: str) -> None:
    cases = [("def add(a, b):", 20), ("x", 5), ("The quick brown fox jumps over the lazy dog. " * 3, 12),
             ("import torch\n", 30), ("héllo wörld", 8), ("Serving many requests at once", 16)]
    alone = [complete(server, prompt=p, max_tokens=n, ignore_eos=True)["choices"][0]["text"] for p, n in cases]

    def run(i: int) -> str:
        p, n = cases[i]
        if i % 2:  # half of them streamed
            events = sse_events(server, "/v1/completions", {"prompt": p, "max_tokens": n, "temperature": 0,
                                                             "ignore_eos": True})
            return "".join(e["choices"][0]["text"] for e in events[:-1])
        return complete(server, prompt=p, max_tokens=n, ignore_eos=True)["choices"][0]["text"]

    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(run, range(len(cases))))
    assert together == alone


def test_a_client_that_disconnects_frees_its_slot(server: str) -> None:
    cancelled = metric(server, "deepseek_moe_requests_finished_total", '{reason="cancelled"}')
    body = {"model": "tiny", "prompt": "def", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        next(lines)
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(f"{server}/v1/completions", json={**body, "stream": False}, timeout=0.5)
    deadline = time.monotonic() + 10
    while metric(server, "deepseek_moe_requests_finished_total", '{reason="cancelled"}') < cancelled + 2:
        assert time.monotonic() < deadline, "the disconnected requests were not cancelled"
        time.sleep(0.05)
    while metric(server, "deepseek_moe_kv_cache_blocks_used") != 0:
        assert time.monotonic() < deadline, "cache blocks were not freed"
        time.sleep(0.05)


def test_a_full_queue_answers_503_with_retry_after(server: str) -> None:
    def run(_: int) -> httpx.Response:
        return httpx.post(f"{server}/v1/completions", json={"prompt": "def", "max_tokens": 60, "ignore_eos": True},
                          timeout=60)

    with ThreadPoolExecutor(24) as pool:  # 4 run, at most 8 wait, the rest are refused
        responses = list(pool.map(run, range(24)))
    busy = [r for r in responses if r.status_code == 503]
    assert busy and all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
                        for r in busy)
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 60
               for r in responses if r.status_code != 503)


BAD: list[tuple[str, bytes | dict[str, Any], int, str | None]] = [
    ("malformed JSON", b'{"prompt": "x",', 400, None),
    ("not an object", b'["x"]', 400, None),
    ("invalid UTF-8", b'{"prompt": "caf\xe9"}', 400, None),
    ("10 MB body", b'{"prompt": "' + b"a" * (10 << 20) + b'"}', 413, None),
    ("unknown model", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("model not a string", {"model": 3, "prompt": "x"}, 400, "model"),
    ("no prompt", {"max_tokens": 3}, 400, "prompt"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("empty token list", {"prompt": []}, 400, "prompt"),
    ("prompt of the wrong type", {"prompt": 5}, 400, "prompt"),
    ("token id outside the vocabulary", {"prompt": [1, 10**6]}, 400, "prompt"),
    ("prompt longer than the context", {"prompt": [1] * (CONTEXT + 10)}, 400, "prompt"),
    ("batch of prompts", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("max_tokens 0", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens past the context", {"prompt": "x", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("max_tokens a string", {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ("max_tokens a bool", {"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("temperature a string", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("temperature too high", {"prompt": "x", "temperature": 3}, 400, "temperature"),
    ("top_p zero", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_k zero", {"prompt": "x", "top_k": 0}, 400, "top_k"),
    ("stream not a bool", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("stop of the wrong type", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("seed a float", {"prompt": "x", "seed": 1.5}, 400, "seed"),
    ("n above its limit", {"prompt": "x", "n": 17}, 400, "n"),
    ("n above the batch (4 rows)", {"prompt": "x", "n": 5}, 400, "n"),
    ("logprobs", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("echo not a bool", {"prompt": "x", "echo": "yes"}, 400, "echo"),
    ("penalty", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("unknown field", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("stream_options without stream", {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
]
BAD_CHAT: list[tuple[str, dict[str, Any], int, str | None]] = [
    ("no messages", {}, 400, "messages"),
    ("messages not a list", {"messages": "hi"}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("content not a string", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("all empty", {"messages": [{"role": "user", "content": ""}]}, 400, "messages"),
    ("tools", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ("max_completion_tokens 0", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     400, "max_completion_tokens"),
]


def check_error(r: httpx.Response, status: int, param: str | None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param and param in error["message"] or error["code"] == "model_not_found"


@pytest.mark.parametrize(("case", "body", "status", "param"), BAD, ids=[c[0] for c in BAD])
def test_bad_completion_requests_get_an_openai_error(server: str, case: str, body: bytes | dict[str, Any],
                                                     status: int, param: str | None) -> None:
    if isinstance(body, dict):
        r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    else:
        r = httpx.post(f"{server}/v1/completions", content=body, headers={"content-type": "application/json"},
                       timeout=60)
    check_error(r, status, param)


@pytest.mark.parametrize(("case", "body", "status", "param"), BAD_CHAT, ids=[c[0] for c in BAD_CHAT])
def test_bad_chat_requests_get_an_openai_error(server: str, case: str, body: dict[str, Any], status: int,
                                               param: str | None) -> None:
    check_error(httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60), status, param)


def test_the_openai_client_sees_the_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=0)


def test_unknown_routes_and_methods_and_still_serving(server: str) -> None:
    r = httpx.get(f"{server}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert httpx.get(f"{server}/v1/completions").status_code == 405
    assert httpx.get(f"{server}/health").status_code == 200
    assert complete(server, prompt="still", max_tokens=3)["usage"]["completion_tokens"] >= 1
    assert metric(server, "deepseek_moe_requests_rejected_total", '{status="400"}') > 0


def test_a_run_directory_serves_its_model_under_the_runs_name(tmp_path: Path) -> None:
    from deepseek_moe.serve.server import checkpoint_dir, default_model_name

    run = tmp_path / "run-1"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    assert checkpoint_dir(run) == run / "model" and default_model_name(run) == "run-1"
    assert default_model_name(run / "model" / ".") == "model"


def test_serve_refuses_max_queue_0_and_drop_at_inference_checkpoints(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses
    import subprocess
    import sys

    import torch

    from deepseek_moe import DeepSeekMoEForCausalLM, save_pretrained
    from deepseek_moe.cli.main import main
    from deepseek_moe.io import CheckpointError
    from deepseek_moe.serve.server import check_servable, load_served_model
    from deepseek_moe.train.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["some text to train on"] * 5, 300)
    config = tiny_config(tokenizer.get_vocab_size())
    # norm_topk_prob with softmax: a config transformers cannot express, so it is saved in our own format, which
    # keeps capacity_factor and drop_at_inference.
    config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, capacity_factor=1.0,
                                                                  drop_at_inference=True, norm_topk_prob=True))
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(config)
    model.tokenizer = tokenizer
    ckpt = tmp_path / "dropping"
    save_pretrained(model, ckpt)
    with pytest.raises(CheckpointError, match="drop_at_inference is true .* set drop_at_inference to false"):
        check_servable(ckpt)
    with pytest.raises(CheckpointError, match="drop_at_inference"):
        load_served_model(ckpt)
    # The CLI refuses before it binds a port or loads a tensor (a child process: were it to serve, it is killed).
    cmd = [sys.executable, "-m", "deepseek_moe.cli.main", "serve", str(ckpt), "--port", str(free_port())]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "drop_at_inference" in done.stderr, done.stderr
    # Every request waits in the queue until a step admits it: a queue of 0 would refuse them all.
    assert main(["serve", str(ckpt), "--max-queue", "0"]) == 2
    assert "--max-queue (0) must be >= 1" in capsys.readouterr().err
    assert main(["serve", str(ckpt), "--max-request-bytes", "10"]) == 2
    assert "--max-request-bytes (10) must be >= 1024" in capsys.readouterr().err
