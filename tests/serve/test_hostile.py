"""A real server under hostile requests: each gets a 4xx naming what was wrong, while a long request streams on
unchanged beside them; afterwards no cache block is held and SIGTERM ends the process within its drain timeout.

What counts as hostile: numbers out of range or not numbers at all (NaN, Infinity, 10^400, 5000-digit
integers, seeds past int64), sizes meant to exhaust (10k stop strings, n = 10^6, a 2 MB body, 100k levels of
nesting), text that is not text (invalid UTF-8, lone surrogates), and requests of the wrong shape (unknown fields,
wrong types, empty or role-less messages, a form-encoded body).
"""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from serve_fixtures import build_checkpoint, running_server

CONTEXT = 1024
LIMIT = 1 << 20  # --max-request-bytes
DRAIN_S = 2.0  # --shutdown-timeout
LONG = {"prompt": "def add(a, b):", "max_tokens": 800, "temperature": 0, "ignore_eos": True}
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]


def raw(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


# (name, path, body: a dict sent as JSON or raw bytes sent as application/json, expected status, expected param)
HOSTILE: list[tuple[str, str, dict[str, Any] | bytes, int, str | None]] = [
    ("seed 2^64", COMPLETIONS, {"prompt": "x", "seed": 1 << 64}, 400, "seed"),
    ("seed 2^63", COMPLETIONS, {"prompt": "x", "seed": 1 << 63}, 400, "seed"),
    ("seed -2^63-1", COMPLETIONS, {"prompt": "x", "seed": -(1 << 63) - 1}, 400, "seed"),
    ("seed 10^30 in chat", CHAT, {"messages": HI, "seed": 10**30}, 400, "seed"),
    ("seed a float", COMPLETIONS, {"prompt": "x", "seed": 1.5}, 400, "seed"),
    ("seed a string", COMPLETIONS, {"prompt": "x", "seed": "7"}, 400, "seed"),
    ("seed a bool", COMPLETIONS, {"prompt": "x", "seed": True}, 400, "seed"),
    ("seed of 5000 digits", COMPLETIONS, raw('{"prompt": "x", "seed": ' + "9" * 5000 + "}"), 400, None),
    ("temperature NaN", COMPLETIONS, raw('{"prompt": "x", "temperature": NaN}'), 400, "temperature"),
    ("top_p Infinity", COMPLETIONS, raw('{"prompt": "x", "top_p": Infinity}'), 400, "top_p"),
    ("temperature -Infinity", CHAT, raw('{"messages": [{"role": "user", "content": "x"}], '
                                        '"temperature": -Infinity}'), 400, "temperature"),
    ("temperature 1e400", COMPLETIONS, raw('{"prompt": "x", "temperature": 1e400}'), 400, "temperature"),
    ("NaN deep inside", CHAT, raw('{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, '
                                  'NaN]}]}'), 400, "messages[0].content[1]"),
    ("temperature a string", COMPLETIONS, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("temperature 3", COMPLETIONS, {"prompt": "x", "temperature": 3}, 400, "temperature"),
    ("top_p 0", COMPLETIONS, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("presence_penalty 1e300", COMPLETIONS, {"prompt": "x", "presence_penalty": 1e300}, 400, "presence_penalty"),
    ("frequency_penalty a list", CHAT, {"messages": HI, "frequency_penalty": [1]}, 400, "frequency_penalty"),
    ("top_k -7", COMPLETIONS, {"prompt": "x", "top_k": -7}, 400, "top_k"),
    ("10k stop strings", COMPLETIONS, {"prompt": "x", "stop": [f"s{i}" for i in range(10_000)]}, 400, "stop"),
    ("a 100k-character stop string", COMPLETIONS, {"prompt": "x", "stop": "z" * 100_000}, 400, "stop"),
    ("an empty stop string", COMPLETIONS, {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("n = 10^6", COMPLETIONS, {"prompt": "x", "n": 10**6}, 400, "n"),
    ("n = 0", CHAT, {"messages": HI, "n": 0}, 400, "n"),
    ("max_tokens -5", COMPLETIONS, {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens 10^30", COMPLETIONS, {"prompt": "x", "max_tokens": 10**30}, 400, "max_tokens"),
    ("max_tokens 1.5", COMPLETIONS, {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ("max_completion_tokens 0", CHAT, {"messages": HI, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("logprobs 21", COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("top_logprobs 30", CHAT, {"messages": HI, "top_logprobs": 30}, 400, "top_logprobs"),
    ("logit_bias", COMPLETIONS, {"prompt": "x", "logit_bias": {str(i): 100 for i in range(1000)}}, 400,
     "logit_bias"),
    ("stream a string", COMPLETIONS, {"prompt": "x", "stream": "true"}, 400, "stream"),
    ("stream_options not an object", COMPLETIONS, {"prompt": "x", "stream": True, "stream_options": [1]}, 400,
     "stream_options"),
    ("ignore_eos a string", COMPLETIONS, {"prompt": "x", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ("100k levels of nesting", COMPLETIONS, raw(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400,
     None),
    ("40 levels of nesting", COMPLETIONS, raw(b'{"prompt": "x", "user": ' + b"[" * 40 + b"]" * 40 + b"}"), 400,
     None),
    ("a 2 MB body", COMPLETIONS, raw(b'{"prompt": "' + b"a" * (2 << 20) + b'"}'), 413, None),
    ("invalid UTF-8", COMPLETIONS, raw(b'{"prompt": "caf\xe9 \xff\xfe"}'), 400, None),
    ("a lone surrogate prompt", COMPLETIONS, raw('{"prompt": "\\ud800"}'), 400, "prompt"),
    ("a lone surrogate in chat", CHAT, raw('{"messages": [{"role": "user", "content": "a\\udfff"}]}'), 400,
     "messages[0].content"),
    ("a lone surrogate stop", COMPLETIONS, raw('{"prompt": "x", "stop": ["\\ud83d"]}'), 400, "stop[0]"),
    ("a lone surrogate key", COMPLETIONS, raw('{"prompt": "x", "\\udc00": 1}'), 400, None),
    ("an unknown field", COMPLETIONS, {"prompt": "x", "max_token": 5}, 400, "max_token"),
    ("an unknown chat field", CHAT, {"messages": HI, "functions": []}, 400, "functions"),
    ("empty body", COMPLETIONS, b"", 400, None),
    ("null body", COMPLETIONS, b"null", 400, None),
    ("an array body", CHAT, b"[1, 2]", 400, None),
    ("empty messages", CHAT, {"messages": []}, 400, "messages"),
    ("a bad role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("no role", CHAT, {"messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ("content an object", CHAT, {"messages": [{"role": "user", "content": {"text": "x"}}]}, 400,
     "messages[0].content"),
    ("an image part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content"),
    ("messages a string", CHAT, {"messages": "hi"}, 400, "messages"),
    ("a message not an object", CHAT, {"messages": ["hi"]}, 400, "messages[0]"),
    ("prompt a number", COMPLETIONS, {"prompt": 5}, 400, "prompt"),
    ("prompt of mixed types", COMPLETIONS, {"prompt": [1, "a", None]}, 400, "prompt"),
    ("token id -1", COMPLETIONS, {"prompt": [-1]}, 400, "prompt"),
    ("token id 10^30", COMPLETIONS, {"prompt": [10**30]}, 400, "prompt"),
    ("100k token ids", COMPLETIONS, {"prompt": [1] * 100_000}, 400, "prompt"),
    ("a 600 kB prompt", COMPLETIONS, {"prompt": "The quick brown fox. " * 30_000}, 400, "prompt"),
    ("response_format json_schema", CHAT, {"messages": HI, "response_format": {"type": "json_schema"}}, 400,
     "response_format.json_schema"),
    ("an unsupported schema keyword", CHAT, {"messages": HI, "response_format": {"type": "json_schema",
     "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, 400,
     "response_format.json_schema.schema"),
    ("guided_regex a number", COMPLETIONS, {"prompt": "x", "guided_regex": 5}, 400, "guided_regex"),
    ("tools", CHAT, {"messages": HI, "tools": [{"type": "function"}] * 100}, 400, "tools"),
    ("a bad request, streamed", CHAT, {"messages": HI, "stream": True, "seed": 1 << 70}, 400, "seed"),
    ("an unknown model", COMPLETIONS, {"model": "gpt-4", "prompt": "x"}, 404, "model"),
]


def send(url: str, path: str, body: dict[str, Any] | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def odd_transport(url: str) -> list[tuple[str, httpx.Response, int]]:
    """Hostile in the HTTP rather than the JSON: content types, methods, routes."""
    return [
        ("a form-encoded body", httpx.post(f"{url}{COMPLETIONS}", data={"prompt": "x"}, timeout=60), 415),
        ("text/plain", httpx.post(f"{url}{CHAT}", content=b'{"messages": []}',
                                  headers={"content-type": "text/plain"}, timeout=60), 415),
        ("GET a POST route", httpx.get(f"{url}{COMPLETIONS}", timeout=60), 405),
        ("an unknown route", httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, timeout=60), 404),
    ]


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def stream_text(lines: list[str]) -> tuple[str, str | None]:
    """The text and finish reason of a streamed completion's ``data:`` lines."""
    text, finish = "", None
    for line in lines:
        if not line or line == "data: [DONE]":
            continue
        chunk = json.loads(line.removeprefix("data: "))
        assert "error" not in chunk, chunk
        text += chunk["choices"][0]["text"]
        finish = chunk["choices"][0]["finish_reason"] or finish
    return text, finish


def test_hostile_requests_beside_a_long_stream(tmp_path: Path) -> None:
    assert len(HOSTILE) >= 40
    ckpt = build_checkpoint(tmp_path / "tiny-ckpt", max_seq_len=CONTEXT)
    args = ("--max-batch-size", "8", "--max-request-bytes", str(LIMIT), "--shutdown-timeout", str(DRAIN_S))
    with running_server(ckpt, *args) as (url, proc):
        alone = httpx.post(f"{url}{COMPLETIONS}", json=LONG, timeout=120).json()["choices"][0]["text"]

        with httpx.stream("POST", f"{url}{COMPLETIONS}", json={**LONG, "stream": True}, timeout=120) as long:
            lines = long.iter_lines()
            first = next(lines)  # the long request is generating from here on
            with ThreadPoolExecutor(8) as pool:
                responses = list(pool.map(lambda case: send(url, case[1], case[2]), HOSTILE))
            transport = odd_transport(url)
            still_running = metric(url, "deepseek_moe_running_batch_size")
            text, finish = stream_text([first, *lines])

        failures = []
        for (name, _, _, status, param), r in zip(HOSTILE, responses, strict=True):
            try:
                error = r.json()["error"]
                ok = r.status_code == status and error["message"] and error["type"] and \
                    (param is None or (error["param"] == param and param in error["message"]))
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                failures.append(f"{name}: {r.status_code} {r.text[:200]}")
        for name, r, status in transport:
            if r.status_code != status or not r.json()["error"]["message"]:
                failures.append(f"{name}: {r.status_code} {r.text[:200]}")
        assert not failures, "\n".join(failures)

        assert still_running >= 1, "the long request ended before the hostile ones did: make it longer"
        assert (text, finish) == (alone, "length")  # unchanged by everything sent beside it
        deadline = time.monotonic() + 10
        while metric(url, "deepseek_moe_kv_cache_blocks_used") != 0:
            assert time.monotonic() < deadline, "cache blocks are still held after every request finished"
            time.sleep(0.05)
        assert 'requests_finished_total{reason="error"}' not in httpx.get(f"{url}/metrics").text  # no 500s
        assert httpx.post(f"{url}{COMPLETIONS}", json={"prompt": "still", "max_tokens": 3}, timeout=60).status_code \
            == 200

        # SIGTERM with a request in flight that needs longer than DRAIN_S: the process drains for DRAIN_S, ends
        # the request cleanly (an error event, then [DONE]), and exits.
        longest = {**LONG, "max_tokens": CONTEXT - 16, "stream": True}
        with httpx.stream("POST", f"{url}{COMPLETIONS}", json=longest, timeout=120) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            tail = [line for line in lines if line]
        assert proc.wait(timeout=DRAIN_S + 20) in (0, -signal.SIGTERM)  # the drain, plus start-up slack
        assert tail[-1] == "data: [DONE]"
        last = json.loads(tail[-2][6:])  # cut by the drain; on a machine fast enough to finish, finished
        assert last.get("error", {}).get("code") == "shutting_down" or last["choices"][0]["finish_reason"] == "length"
