"""Does a huge prompt freeze other clients? A real server (the tiny test checkpoint) gets a ~3.5 MB prompt while
another process polls ``/health`` every 10 ms; prints how long the big request took and the worst and median
``/health`` latency meanwhile (before issue 19 the worst equalled the whole tokenization: it ran on the event
loop), as a table and one JSON line.

    python benchmarks/serve_event_loop.py
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import uptime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
from serve_fixtures import build_checkpoint, running_server  # noqa: E402

WORDS = ["héllo", "wörld", "quick", "brown", "fox", "✓", "漢字", "def", "return"]


def poll(url: str, stop: Any, out: Any) -> None:
    gaps = []
    while not stop.is_set():
        start = time.perf_counter()
        httpx.get(f"{url}/health", timeout=60)
        gaps.append(time.perf_counter() - start)
        time.sleep(0.01)
    out.put(gaps)


def main() -> None:
    random.seed(0)
    prompt = " ".join(random.choice(WORDS) + str(random.randrange(1000)) for _ in range(400_000))[:3_900_000]
    with tempfile.TemporaryDirectory() as tmp, running_server(build_checkpoint(Path(tmp) / "tiny")) as (url, _):
        stop, out = mp.Event(), mp.Queue()
        poller = mp.Process(target=poll, args=(url, stop, out))
        poller.start()
        time.sleep(0.5)
        start = time.perf_counter()
        status = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=300).status_code
        big = time.perf_counter() - start
        time.sleep(0.3)
        stop.set()
        gaps = sorted(out.get())
        poller.join()
    row = {"prompt_mb": len(prompt.encode()) / 1e6, "status": status, "request_s": big,
           "health_max_ms": 1e3 * gaps[-1], "health_median_ms": 1e3 * gaps[len(gaps) // 2], "polls": len(gaps)}
    print(uptime())
    print(f"{'prompt MB':>9} {'status':>6} {'request s':>9} {'/health max ms':>14} {'/health median ms':>17}")
    print(f"{row['prompt_mb']:>9.1f} {status:>6} {big:>9.2f} {row['health_max_ms']:>14.0f} "
          f"{row['health_median_ms']:>17.1f}")
    print(json.dumps({"benchmark": "serve_event_loop", **row}))


if __name__ == "__main__":
    main()
