"""SIGTERM with requests in flight: what can finish within --shutdown-timeout finishes, the rest ends cleanly
(a 503 error object, or an error event and [DONE] on a stream), and the process exits."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from serve_fixtures import build_checkpoint, running_server


def gauge(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(f"deepseek_moe_{name} ")))


def wait_until(ready: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """On a loaded machine a fixed sleep is not enough for a request to arrive and be admitted."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def test_shutdown_with_requests_in_flight(tmp_path: Path) -> None:
    ckpt = build_checkpoint(tmp_path / "tiny-ckpt", max_seq_len=4096)  # long requests: seconds, not ms
    results: dict[str, Any] = {}
    with running_server(ckpt, "--max-batch-size", "2", "--shutdown-timeout", "3") as (url, proc):
        def short() -> None:
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "def", "max_tokens": 10, "ignore_eos": True},
                           timeout=60)
            results["short"] = (r.status_code, r.json())

        def long_stream() -> None:
            body = {"prompt": "import", "max_tokens": 4000, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                results["stream"] = [line for line in r.iter_lines() if line]

        def long_plain() -> None:  # waits in the queue behind the two above (batch size 2)
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 4000, "ignore_eos": True},
                           timeout=60)
            results["plain"] = (r.status_code, r.json())

        threads = [threading.Thread(target=f) for f in (long_stream, short, long_plain)]
        threads[0].start()
        wait_until(lambda: gauge(url, "running_batch_size") == 1, "the stream runs")
        threads[1].start()
        wait_until(lambda: gauge(url, "running_batch_size") == 2 or "short" in results, "the short one runs")
        threads[2].start()
        # plain waits in the queue, or (the short one done) runs beside the stream: either way it cannot finish
        wait_until(lambda: gauge(url, "queue_depth") == 1 or gauge(url, "running_batch_size") == 2
                   and "short" in results, "the plain one arrives")
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=30)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)

    status, body = results["short"]
    assert status == 200 and body["usage"]["completion_tokens"] == 10  # finished within the timeout
    lines = results["stream"]  # 4000 tokens cannot finish within the 3 s allowed: cut, cleanly
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["error"]["code"] == "shutting_down"
    status, body = results["plain"]
    assert status == 503 and body["error"]["code"] == "shutting_down"
