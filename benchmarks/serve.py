"""Does continuous batching pay off behind HTTP, and where does the time go?

Starts two ``deepseek-moe serve`` processes on the same checkpoint (default: the ``tiny`` preset, random weights,
with a byte-level BPE tokenizer trained here in a second), one batching (``--max-batch-size 64``) and one not
(``--max-batch-size 1``), and drives them from a separate client process with N concurrent clients (1, 4, 16,
64). Every request is a fixed prompt of mixed length (``--prompt-lens``) asking for exactly ``--max-tokens``
tokens (EOS ignored, greedy). Cells are interleaved: for each N and each of non-streaming / streaming, the
batching server, then the non-batching one, so drift in machine load hits both alike.

Per cell: output tokens/s over the cell's wall time; time to first token and time per output token (p50, p99)
— measured by the client on a stream, and taken from the server's ``X-Time-To-First-Token`` /
``X-Time-Per-Output-Token`` response headers for non-streamed requests (their client sees only the whole
response); and the share of the wall time the scheduler spent inside model forwards (fwd%, from /metrics), and
of that its thread's CPU time (cpu%): fwd% - cpu% is forward time spent waiting for the GIL (held by the HTTP
thread's per-token JSON and SSE work) or for a core; 100 - fwd% is time outside forwards (HTTP, tokenizing,
sampling, queueing), which does not batch.

A second run (``--runs chat``) asks what a default OpenAI chat client gets: chat requests with no
``max_tokens`` (default sampling, temperature 1), 16 clients in a closed loop, on a cache shaped like
DeepSeek-V2-Lite's at the default 1 GiB ``--kv-cache-memory``: the same number of blocks (2157 of 16 tokens,
34,496 tokens: V2-Lite caches 27 layers x (512 + 64) bf16 values = 31,104 bytes per token) and V2-Lite's context
(163,840 tokens, so a request without ``max_tokens`` may grow to the whole cache). The model is the ``--preset``
(small, so it runs on two cores) with its context raised to V2-Lite's, given the bytes that buy it those blocks.
Random weights rarely sample the end-of-text token, so requests run long: each server is measured over a fixed
window (``--chat-seconds``, after ``--chat-warmup``) as generated tokens per second from its /metrics, with the
running batch size sampled meanwhile; the clients then disconnect. On the old scheduler, which reserved prompt +
max_tokens up front, one such request took every block and this ratio was about 1.

A third run (``--runs prefix``) measures prefix caching: 16 clients (``--prefix-clients``) each stream
``--prefix-requests`` completions, one after another, of a shared 1,000-token system prompt (``--system-tokens``)
followed by 16..47 tokens of their own, against a server with prefix caching (the default) and one with
``--no-prefix-cache``, in interleaved rounds, on the ``--preset`` model with its context raised to 2,048. Both
servers first answer one request of the system prompt alone (the steady state of a deployment, where earlier
traffic has used it; it also warms them up). Reported: time to first token (client-measured, p50 and p99),
output tokens/s over each round's wall time, and the hit rate from /metrics.

Prints a table and one JSON line. ``python benchmarks/serve.py --help`` for the knobs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import uptime  # noqa: E402

CLIENTS = (1, 4, 16, 64)


V2_LITE_CACHE_BYTES = 1 << 30  # serve's default --kv-cache-memory
BLOCK_SIZE = 16  # serve's default --block-size


def build_checkpoint(path: Path, preset: str, max_seq_len: int | None = None) -> None:
    import dataclasses

    import torch

    from deepseek_moe import DeepSeekMoEForCausalLM, get_preset, save_pretrained
    from deepseek_moe.train.tokenizer import train_tokenizer

    cfg = get_preset(preset)
    if max_seq_len is not None:
        cfg = dataclasses.replace(cfg, max_seq_len=max_seq_len, original_seq_len=max_seq_len)
    texts = [p.read_text(errors="replace") for p in sorted(Path(json.__file__).parent.glob("*.py"))]
    tokenizer = train_tokenizer(texts, min(cfg.vocab_size, 2048))
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(cfg)
    model.tokenizer = tokenizer
    save_pretrained(model, path)


def start_server(ckpt: Path, port: int, batch: int, threads: int, dtype: str | None, *extra: str
                 ) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "deepseek_moe.cli.main", "serve", str(ckpt), "--port", str(port),
           "--served-model-name", "bench", "--max-batch-size", str(batch), "--max-batch-tokens", "512",
           "--max-queue", "1024", "--threads", str(threads), *extra] + (["--dtype", dtype] if dtype else [])
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)


def wait_healthy(url: str, proc: subprocess.Popen[str]) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server for {url} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server {url} not healthy after 120 s")


def forward_seconds(url: str) -> tuple[float, float]:
    """(wall, scheduler-thread CPU) seconds the server has spent inside model forwards."""
    import httpx

    text = httpx.get(f"{url}/metrics").text
    found = [re.search(rf"^deepseek_moe_forward{kind}_seconds_total (\S+)$", text, re.MULTILINE)
             for kind in ("", "_cpu")]
    wall, cpu = (float(m.group(1)) if m else 0.0 for m in found)
    return wall, cpu


# --- the client process ------------------------------------------------------------------------------------


async def one_request(client: Any, url: str, prompt: list[int], max_tokens: int, stream: bool) -> dict[str, Any]:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    start = time.perf_counter()
    if not stream:
        r = await client.post(f"{url}/v1/completions", json=body)
        r.raise_for_status()
        return {"tokens": r.json()["usage"]["completion_tokens"], "ttft": float(r.headers["x-time-to-first-token"]),
                "tpot": float(r.headers["x-time-per-output-token"])}
    times, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                times.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"tokens": tokens, "ttft": times[0] - start, "tpot": statistics.mean(gaps) if gaps else 0.0}


async def drive(url: str, n_clients: int, n_requests: int, prompts: list[list[int]], max_tokens: int,
                stream: bool) -> dict[str, Any]:
    import httpx

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=n_clients, max_keepalive_connections=n_clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                results.append(await one_request(client, url, prompts[i % len(prompts)], max_tokens, stream))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(n_clients)))
        wall = time.perf_counter() - start
    return {"wall_s": wall, "results": results}


CHAT_MESSAGES = ["Hi! How are you today?", "Write a haiku about the sea.",
                 "Explain continuous batching in one paragraph.", "What is 17 times 23?",
                 "Give me three names for a cat.", "Translate 'good morning' into French and German."]


async def chat_window(url: str, n_clients: int, warmup: float, window: float) -> dict[str, Any]:
    """``n_clients`` closed-loop clients streaming default chat requests (no max_tokens); after ``warmup``
    seconds, the server's generated tokens over ``window`` seconds and its running batch size, sampled."""
    import httpx

    def metric(text: str, name: str) -> float:
        m = re.search(rf"^deepseek_moe_{name} (\S+)$", text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    finished = 0
    limits = httpx.Limits(max_connections=n_clients + 2, max_keepalive_connections=n_clients + 2)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        async def worker(i: int) -> None:
            nonlocal finished
            while True:
                body = {"model": "bench", "stream": True,
                        "messages": [{"role": "user", "content": CHAT_MESSAGES[i % len(CHAT_MESSAGES)]}]}
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    r.raise_for_status()
                    async for _ in r.aiter_lines():
                        pass
                finished += 1

        tasks = [asyncio.create_task(worker(i)) for i in range(n_clients)]
        await asyncio.sleep(warmup)
        t0, m0 = time.perf_counter(), (await client.get(f"{url}/metrics")).text
        batch: list[float] = []
        while time.perf_counter() - t0 < window:
            await asyncio.sleep(min(0.5, max(0.0, window - (time.perf_counter() - t0))))
            batch.append(metric((await client.get(f"{url}/metrics")).text, "running_batch_size"))
        t1, m1 = time.perf_counter(), (await client.get(f"{url}/metrics")).text
        for t in tasks:
            t.cancel()
        errors = [r for r in await asyncio.gather(*tasks, return_exceptions=True)
                  if not isinstance(r, asyncio.CancelledError)]
        if errors:
            raise SystemExit(f"a chat client failed: {errors[0]!r}")
    tokens = metric(m1, "generation_tokens_total") - metric(m0, "generation_tokens_total")
    return {"wall_s": round(t1 - t0, 3), "output_tokens": int(tokens), "tokens_per_s": round(tokens / (t1 - t0), 1),
            "mean_running": round(statistics.mean(batch), 2) if batch else 0.0,
            "max_running": max(batch, default=0.0), "requests_finished": finished,
            "kv_blocks_used": metric(m1, "kv_cache_blocks_used"), "kv_blocks_total": metric(m1, "kv_cache_blocks_total")}


async def prefix_clients(url: str, n_clients: int, system: list[int], suffixes: list[list[int]], max_tokens: int,
                         rounds: int) -> dict[str, Any]:
    """``n_clients`` closed-loop clients, each streaming ``rounds`` completions of ``system`` + its own suffix."""
    import httpx

    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=n_clients, max_keepalive_connections=n_clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(i: int) -> None:
            for r in range(rounds):
                prompt = system + suffixes[(i * rounds + r) % len(suffixes)]
                results.append(await one_request(client, url, prompt, max_tokens, True))

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(n_clients)))
        wall = time.perf_counter() - start
    return {"wall_s": wall, "results": results}


def client_main(args: argparse.Namespace) -> None:
    spec = json.loads(args.client)
    if spec.get("mode") == "chat":
        print(json.dumps(asyncio.run(chat_window(spec["url"], spec["clients"], spec["warmup"], spec["window"]))))
        return
    if spec.get("mode") == "prefix":
        print(json.dumps(asyncio.run(prefix_clients(spec["url"], spec["clients"], spec["system"], spec["suffixes"],
                                                    spec["max_tokens"], spec["rounds"]))))
        return
    out = asyncio.run(drive(spec["url"], spec["clients"], spec["requests"], spec["prompts"], spec["max_tokens"],
                            spec["stream"]))
    print(json.dumps(out))


# --- the driver --------------------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def run_cell(url: str, n_clients: int, stream: bool, prompts: list[list[int]], args: argparse.Namespace
             ) -> dict[str, Any]:
    n_requests = max(args.waves * n_clients, args.min_requests)
    spec = {"url": url, "clients": n_clients, "requests": n_requests, "prompts": prompts,
            "max_tokens": args.max_tokens, "stream": stream}
    wall0, cpu0 = forward_seconds(url)
    proc = subprocess.run([sys.executable, __file__, "--client", json.dumps(spec)], capture_output=True, text=True,
                          check=True)
    wall1, cpu1 = forward_seconds(url)
    out = json.loads(proc.stdout)
    results, wall = out["results"], out["wall_s"]
    tokens = sum(r["tokens"] for r in results)
    assert tokens == n_requests * args.max_tokens, f"got {tokens} tokens"
    ttft, tpot = [r["ttft"] for r in results], [r["tpot"] for r in results]
    return {"clients": n_clients, "stream": stream, "requests": n_requests, "output_tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": round(pct(ttft, 0.5), 4), "ttft_p99_s": round(pct(ttft, 0.99), 4),
            "tpot_p50_s": round(pct(tpot, 0.5), 4), "tpot_p99_s": round(pct(tpot, 0.99), 4),
            "forward_share": round((wall1 - wall0) / wall, 3), "forward_cpu_share": round((cpu1 - cpu0) / wall, 3)}


def run_grid(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The clients x streaming grid, batching on and off: prints its table, returns its JSON part."""
    import torch

    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = tmp / f"{args.preset}-random"
        build_checkpoint(ckpt, args.preset)
    from deepseek_moe import from_pretrained

    vocab = from_pretrained(ckpt).config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, min(vocab, 2048), (n,), generator=g).tolist() for n in args.prompt_lens]
    servers = {"on": (args.port, 64), "off": (args.port + 1, 1)}
    procs = {k: start_server(ckpt, port, batch, args.threads, args.dtype) for k, (port, batch) in servers.items()}
    try:
        urls = {k: f"http://127.0.0.1:{port}" for k, (port, _) in servers.items()}
        for k in procs:
            wait_healthy(urls[k], procs[k])
        for k in urls:  # warm-up: first-call costs stay out of the cells
            run_cell(urls[k], 2, False, prompts, argparse.Namespace(**{**vars(args), "min_requests": 2, "waves": 1}))
        rows = []
        for n in args.clients:
            for stream in (False, True):
                for k in ("on", "off"):
                    row = {"batching": k, **run_cell(urls[k], n, stream, prompts, args)}
                    rows.append(row)
                    print(f"  {k:>3} clients={n:<3} stream={stream!s:<5} {row['tokens_per_s']:>8.1f} tok/s",
                          file=sys.stderr, flush=True)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=60)

    print(f"\n{ckpt.name}: prompts of {args.prompt_lens} tokens, {args.max_tokens} output tokens each (EOS "
          f"ignored), greedy; batching on = --max-batch-size 64, off = 1; {args.threads} torch thread(s)/server, "
          f"{args.dtype or 'checkpoint dtype'}")
    head = (f"{'clients':>7} {'stream':>6} {'batch':>5} {'tok/s':>8} {'ratio':>6} {'TTFT p50':>9} {'p99':>7} "
            f"{'TPOT p50':>9} {'p99':>7} {'fwd%':>5} {'cpu%':>5}")
    print(head)
    ratios = {}
    for row in rows:
        twin = next(r for r in rows if r["clients"] == row["clients"] and r["stream"] == row["stream"]
                    and r["batching"] == "off")
        ratio = row["tokens_per_s"] / twin["tokens_per_s"]
        if row["batching"] == "on":
            ratios[f"{row['clients']}{'_stream' if row['stream'] else ''}"] = round(ratio, 2)
        print(f"{row['clients']:>7} {'yes' if row['stream'] else 'no':>6} {row['batching']:>5} "
              f"{row['tokens_per_s']:>8.1f} {ratio if row['batching'] == 'on' else 1.0:>6.2f} "
              f"{row['ttft_p50_s']:>9.3f} {row['ttft_p99_s']:>7.3f} {row['tpot_p50_s']:>9.4f} "
              f"{row['tpot_p99_s']:>7.4f} {100 * row['forward_share']:>5.0f} {100 * row['forward_cpu_share']:>5.0f}")
    floor = next((r for r in rows if r["clients"] == 16 and not r["stream"] and r["batching"] == "on"), None)
    verdict = None
    if floor is not None:
        verdict = {"ratio_16": ratios.get("16"), "ttft_p99_16_s": floor["ttft_p99_s"],
                   "pass": bool(ratios.get("16", 0) >= 4 and floor["ttft_p99_s"] < 2.0)}
        print(f"\nfloor (16 clients, non-streaming): {ratios.get('16')}x batching off (need >= 4), "
              f"p99 TTFT {floor['ttft_p99_s']:.3f} s (need < 2): {'PASS' if verdict['pass'] else 'FAIL'}")
    return {"rows": rows, "ratios_on_over_off": ratios, "floor": verdict}


def v2_lite_shaped_cache(preset: str, dtype: str | None) -> dict[str, int]:
    """The blocks V2-Lite's cache gets from the default 1 GiB, and the bytes that give ``preset`` as many."""
    import torch

    from deepseek_moe import get_preset
    from deepseek_moe.model.counting import kv_cache_bytes_per_token

    v2 = get_preset("deepseek_v2_lite")
    v2_per_token = kv_cache_bytes_per_token(v2, torch.bfloat16)
    blocks = V2_LITE_CACHE_BYTES // (v2_per_token * BLOCK_SIZE)
    small_per_token = kv_cache_bytes_per_token(get_preset(preset), getattr(torch, dtype or "float32"))
    return {"v2_lite_bytes_per_token": v2_per_token, "blocks": blocks, "tokens": (blocks - 1) * BLOCK_SIZE,
            "context": v2.max_seq_len, "model_bytes_per_token": small_per_token,
            "kv_cache_memory": blocks * BLOCK_SIZE * small_per_token}


def run_chat(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Default chat requests at ``--chat-clients`` on a V2-Lite-shaped cache, batching on and off, interleaved
    over ``--chat-rounds``: prints its table, returns its JSON part."""
    shape = v2_lite_shaped_cache(args.preset, args.dtype)
    ckpt = tmp / f"{args.preset}-random-ctx{shape['context']}"
    build_checkpoint(ckpt, args.preset, max_seq_len=shape["context"])
    extra = ("--kv-cache-memory", str(shape["kv_cache_memory"]), "--block-size", str(BLOCK_SIZE))
    servers = {"on": (args.port + 2, 64), "off": (args.port + 3, 1)}
    rows = []
    for round_ in range(args.chat_rounds):
        for k, (port, batch) in servers.items():  # one server at a time: the other would take a core
            proc = start_server(ckpt, port, batch, args.threads, args.dtype, *extra)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_healthy(url, proc)
                spec = {"mode": "chat", "url": url, "clients": args.chat_clients, "warmup": args.chat_warmup,
                        "window": args.chat_seconds}
                out = subprocess.run([sys.executable, __file__, "--client", json.dumps(spec)], capture_output=True,
                                     text=True, check=True)
                rows.append({"batching": k, "round": round_, **json.loads(out.stdout)})
                print(f"  chat {k:>3} round {round_}: {rows[-1]['tokens_per_s']:>8.1f} tok/s, running "
                      f"{rows[-1]['mean_running']}", file=sys.stderr, flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    rate = {k: statistics.mean(r["tokens_per_s"] for r in rows if r["batching"] == k) for k in servers}
    ratio = round(rate["on"] / rate["off"], 2) if rate["off"] else None
    print(f"\ndefault chat requests (no max_tokens, temperature 1, streamed), {args.chat_clients} clients, "
          f"{args.preset} model with a V2-Lite-shaped cache: {shape['blocks']} blocks x {BLOCK_SIZE} tokens "
          f"(V2-Lite: {shape['v2_lite_bytes_per_token']} bytes/token in 1 GiB; here --kv-cache-memory "
          f"{shape['kv_cache_memory']} at {shape['model_bytes_per_token']} bytes/token), context "
          f"{shape['context']}; {args.chat_seconds} s windows after {args.chat_warmup} s warm-up; "
          f"{args.threads} torch thread(s)")
    print(f"{'round':>5} {'batch':>5} {'tok/s':>8} {'running':>8} {'max':>4} {'finished':>8} {'blocks used':>12}")
    for r in rows:
        print(f"{r['round']:>5} {r['batching']:>5} {r['tokens_per_s']:>8.1f} {r['mean_running']:>8.2f} "
              f"{r['max_running']:>4.0f} {r['requests_finished']:>8} {r['kv_blocks_used']:>6.0f}/"
              f"{r['kv_blocks_total']:<5.0f}")
    verdict = {"ratio": ratio, "pass": bool(ratio is not None and ratio >= 3)}
    print(f"batching on / off: {ratio}x (need >= 3): {'PASS' if verdict['pass'] else 'FAIL'}")
    return {"rows": rows, "cache": shape, "ratio_on_over_off": ratio, "verdict": verdict}


def run_prefix(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """``--prefix-clients`` clients whose prompts share a ``--system-tokens`` system prompt, each with its own
    question, against a server with prefix caching and one with ``--no-prefix-cache``, interleaved over
    ``--prefix-rounds``: prints its table, returns its JSON part."""
    import httpx
    import torch

    ckpt = tmp / f"{args.preset}-random-ctx2048"
    build_checkpoint(ckpt, args.preset, max_seq_len=2048)
    from deepseek_moe import from_pretrained

    vocab = min(from_pretrained(ckpt).config.vocab_size, 2048)
    g = torch.Generator().manual_seed(1)
    system = torch.randint(1, vocab, (args.system_tokens,), generator=g).tolist()
    suffixes = [torch.randint(1, vocab, (int(n),), generator=g).tolist()
                for n in torch.randint(16, 48, (4 * args.prefix_clients,), generator=g)]
    servers = {"on": (args.port + 4, ()), "off": (args.port + 5, ("--no-prefix-cache",))}
    procs = {k: start_server(ckpt, port, 64, args.threads, args.dtype, *extra)
             for k, (port, extra) in servers.items()}
    rows = []
    try:
        urls = {k: f"http://127.0.0.1:{port}" for k, (port, _) in servers.items()}
        for k in procs:
            wait_healthy(urls[k], procs[k])
            # Warm-up, and the steady state a system prompt is in: an earlier request has used it.
            httpx.post(f"{urls[k]}/v1/completions", json={"model": "bench", "prompt": system, "max_tokens": 1},
                       timeout=600).raise_for_status()
        for round_ in range(args.prefix_rounds):
            for k in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                spec = {"mode": "prefix", "url": urls[k], "clients": args.prefix_clients, "system": system,
                        "suffixes": suffixes, "max_tokens": args.prefix_max_tokens, "rounds": args.prefix_requests}
                out = json.loads(subprocess.run([sys.executable, __file__, "--client", json.dumps(spec)],
                                                capture_output=True, text=True, check=True).stdout)
                results, wall = out["results"], out["wall_s"]
                tokens = sum(r["tokens"] for r in results)
                assert tokens == len(results) * args.prefix_max_tokens, f"got {tokens} tokens"
                ttft = [r["ttft"] for r in results]
                rows.append({"prefix_cache": k, "round": round_, "requests": len(results), "output_tokens": tokens,
                             "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
                             "ttft_p50_s": round(pct(ttft, 0.5), 4), "ttft_p99_s": round(pct(ttft, 0.99), 4)})
                print(f"  prefix cache {k:>3} round {round_}: {rows[-1]['tokens_per_s']:>7.1f} tok/s, TTFT p50 "
                      f"{rows[-1]['ttft_p50_s']:.3f} s", file=sys.stderr, flush=True)
        hit_rate = float(re.search(r"^deepseek_moe_prefix_cache_hit_rate (\S+)$",
                                   httpx.get(f"{urls['on']}/metrics").text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=60)
    mean = {k: {m: statistics.mean(r[m] for r in rows if r["prefix_cache"] == k)
                for m in ("tokens_per_s", "ttft_p50_s")} for k in servers}
    ttft_x = round(mean["off"]["ttft_p50_s"] / mean["on"]["ttft_p50_s"], 2)
    tput_x = round(mean["on"]["tokens_per_s"] / mean["off"]["tokens_per_s"], 2)
    print(f"\n{args.prefix_clients} clients x {args.prefix_requests} streamed completions each: a shared "
          f"{args.system_tokens}-token system prompt + 16..47 own tokens, {args.prefix_max_tokens} output tokens "
          f"(greedy, EOS ignored); {args.preset} model (random weights), {args.threads} torch thread(s)/server; "
          f"prefix cache on = default, off = --no-prefix-cache; rounds interleaved")
    print(f"{'round':>5} {'prefix cache':>12} {'tok/s':>8} {'TTFT p50 s':>10} {'p99 s':>7}")
    for r in rows:
        print(f"{r['round']:>5} {r['prefix_cache']:>12} {r['tokens_per_s']:>8.1f} {r['ttft_p50_s']:>10.3f} "
              f"{r['ttft_p99_s']:>7.3f}")
    verdict = {"ttft_p50_off_over_on": ttft_x, "tokens_per_s_on_over_off": tput_x, "hit_rate_on": round(hit_rate, 3),
               "pass": bool(ttft_x >= 5 and tput_x >= 2)}
    print(f"prefix cache: TTFT p50 {ttft_x}x better (need >= 5), throughput {tput_x}x (need >= 2), hit rate "
          f"{hit_rate:.3f}: {'PASS' if verdict['pass'] else 'FAIL'}")
    return {"rows": rows, "verdict": verdict}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", choices=("grid", "chat", "prefix"), default=["grid", "chat", "prefix"],
                   help="grid: the clients x streaming grid; chat: default chat requests on a V2-Lite-shaped cache; "
                   "prefix: clients sharing a system prompt, prefix caching on and off")
    p.add_argument("--checkpoint", type=Path, help="grid: serve this checkpoint instead of a random --preset")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (EOS ignored)")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[8, 32, 96, 200])
    p.add_argument("--waves", type=int, default=2, help="requests per client per cell (default 2: the second "
                   "wave arrives while the first decodes, as in steady serving)")
    p.add_argument("--min-requests", type=int, default=8, help="requests per cell: max(waves * clients, this)")
    p.add_argument("--chat-clients", type=int, default=16)
    p.add_argument("--chat-seconds", type=float, default=10.0, help="chat: measured window per server")
    p.add_argument("--chat-warmup", type=float, default=3.0, help="chat: seconds before the window starts")
    p.add_argument("--chat-rounds", type=int, default=2, help="chat: on/off pairs, interleaved")
    p.add_argument("--prefix-clients", type=int, default=16)
    p.add_argument("--system-tokens", type=int, default=1000, help="prefix: the shared system prompt's tokens")
    p.add_argument("--prefix-requests", type=int, default=2, help="prefix: requests per client per round")
    p.add_argument("--prefix-max-tokens", type=int, default=16, help="prefix: output tokens per request")
    p.add_argument("--prefix-rounds", type=int, default=2, help="prefix: on/off pairs, interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch threads per server (default 1: the client "
                   "process needs the other core)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="serve in this dtype (default: the checkpoint's)")
    p.add_argument("--port", type=int, default=18431)
    p.add_argument("--client", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        client_main(args)
        return
    result: dict[str, Any] = {"benchmark": "serve"}
    with tempfile.TemporaryDirectory() as tmp:
        if "grid" in args.runs:
            result.update(run_grid(args, Path(tmp)))
        if "chat" in args.runs:
            result["chat_default"] = run_chat(args, Path(tmp))
        if "prefix" in args.runs:
            result["prefix_cache"] = run_prefix(args, Path(tmp))
    result["uptime"] = uptime()
    print(result["uptime"])
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "client"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
