"""The chat page in a real browser: Debian's chromium driven by Playwright (``executable_path``; Playwright's own
browser downloads are not used). It loads, streams a reply equal to the same request made without the page, and
the expert heatmap fills from /stats. Skipped where Playwright or a chromium is not installed.

Also, without a browser: /stats reports the routed tokens of a sliding window, and GET / serves the page."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_fixtures import build_checkpoint, running_server

from deepseek_moe.serve.metrics import ServeMetrics


def chromium() -> str | None:
    """$CHROMIUM, else a chromium on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ckpt = build_checkpoint(tmp_path_factory.mktemp("page") / "tiny-ckpt")
    with running_server(ckpt, "--max-batch-size", "4") as (url, _):
        yield url


def test_expert_load_window_slides() -> None:
    m = ServeMetrics([1, 2], 3)
    t0 = 1000.0
    m._snapshots.clear()
    m._snapshots.append((t0, m.expert_load()))
    import torch
    m.add_expert_load(1, torch.tensor([1, 0, 2]))
    m.snapshot_expert_load(t0 + 1)
    m.add_expert_load(2, torch.tensor([0, 5, 0]))
    m.snapshot_expert_load(t0 + 5)
    load, covered = m.expert_load_window(10, now=t0 + 6)  # everything since the start
    assert load == {1: [1, 0, 2], 2: [0, 5, 0]} and covered == 6
    load, covered = m.expert_load_window(3, now=t0 + 6)  # since the snapshot at t0 + 1
    assert load == {1: [0, 0, 0], 2: [0, 5, 0]} and covered == 5
    load, covered = m.expert_load_window(1, now=t0 + 6.5)  # since t0 + 5: nothing routed after it
    assert load == {1: [0, 0, 0], 2: [0, 0, 0]} and covered == 1.5


def test_stats_and_page_routes(server: str) -> None:
    before = httpx.get(f"{server}/stats?window=300").json()  # a window longer than the test: nothing drops out
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "def add", "max_tokens": 5, "temperature": 0,
                                                     "ignore_eos": True}, timeout=60)
    assert r.status_code == 200
    after = httpx.get(f"{server}/stats?window=300").json()
    counts = after["expert_tokens"]["counts"]
    assert len(counts) == len(after["expert_tokens"]["layers"]) == 2 and all(len(row) == 8 for row in counts)
    tokens = r.json()["usage"]["total_tokens"] - 1  # the last token is never fed back
    for row, old in zip(counts, before["expert_tokens"]["counts"], strict=True):  # top-2 routing per token
        assert sum(row) - sum(old) == 2 * tokens
    assert after["kv_cache_blocks_total"] > 0 and after["max_batch_size"] == 4
    assert httpx.get(f"{server}/stats?window=0").status_code == 400
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("static/page.js", "static/page.css"):
        assert httpx.get(f"{server}/{asset}").status_code == 200


def test_page_streams_a_reply_and_the_heatmap_updates(server: str, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    executable = chromium()
    if executable is None:
        pytest.skip("no chromium installed (apt-get install chromium, or set $CHROMIUM)")
    question = "def add(a, b):"
    expected = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0}).json()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/?window=300")  # longer than the test: the total only grows
            page.wait_for_function("document.getElementById('model-name').textContent.startsWith('tiny')")
            page.wait_for_function("Number(document.getElementById('heatmap').dataset.updates) >= 1")
            total_before = int(page.get_attribute("#heatmap", "data-total") or 0)
            page.fill("#max-tokens", "24")
            page.fill("#temperature", "0")
            page.fill("#prompt", question)
            page.press("#prompt", "Enter")
            page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
            reply = page.evaluate("document.querySelector('.msg.assistant').firstChild.textContent")
            assert reply == expected["choices"][0]["message"]["content"]
            # The heatmap counts the tokens the reply routed (it polls every 0.5 s).
            page.wait_for_function(f"Number(document.getElementById('heatmap').dataset.total) > {total_before}",
                                   timeout=10_000)
            assert page.text_content("#status") == "live"
            shot = Path(os.environ.get("PAGE_SCREENSHOT_DIR", tmp_path)) / "page.png"
            page.screenshot(path=str(shot))
            assert not errors, errors
        finally:
            browser.close()
