"""What structured output costs per generated token: the scheduler decoding a batch of requests with and without
a JSON-schema constraint, side by side (interleaved rounds), and the mask alone (llguidance's fill + the
vectorised bitmask apply) per row.

The model is the ``tiny`` preset with random weights; the tokenizer a byte-level BPE trained on the Python
standard library's sources (``--vocab`` tokens, default 32000: the mask's cost grows with the vocabulary). The
schema is an array of strings, which never completes, so every request decodes ``--tokens`` tokens and both
arms generate the same count. Prints a table and one JSON line.

    python benchmarks/serve_structured.py --batch 1 8 --tokens 32 --rounds 3
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import sysconfig
import time
from typing import Any

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import uptime  # noqa: E402

from deepseek_moe import DeepSeekMoEForCausalLM  # noqa: E402
from deepseek_moe.presets import tiny  # noqa: E402
from deepseek_moe.serve.scheduler import Request, SamplingParams, Scheduler, SchedulerConfig  # noqa: E402
from deepseek_moe.serve.structured import GrammarCompiler, OutputFormat, constrain  # noqa: E402
from deepseek_moe.train.tokenizer import train_tokenizer  # noqa: E402

SCHEMA = {"type": "array", "items": {"type": "string"}}
EOS = 0


def stdlib_tokenizer(vocab: int, n_files: int) -> Any:
    files = sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/**/*.py", recursive=True))[:n_files]
    return train_tokenizer([open(f, errors="replace").read() for f in files], vocab)


def decode_seconds_per_token(s: Scheduler, prompt: list[int], batch: int, tokens: int,
                             compiler: GrammarCompiler | None) -> float:
    """Submit ``batch`` requests, run their prefill, then time the decode steps: seconds per generated token."""
    fmt = OutputFormat("json_schema", json.dumps(SCHEMA), "bench")
    for i in range(batch):
        constraint = compiler.constraint(fmt) if compiler is not None else None
        params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=True,
                                stop_token_ids=frozenset({EOS}))
        s.submit(Request(prompt, params, lambda e: None, constraint=constraint))
    s.step()  # the prefill (and first token) of every request
    before = s.metrics.generation_tokens.value
    start = time.perf_counter()
    while s.has_work():
        s.step()
    return (time.perf_counter() - start) / (s.metrics.generation_tokens.value - before)


def mask_seconds_per_row(compiler: GrammarCompiler, batch: int, vocab: int, reps: int) -> float:
    """``constrain`` alone on a batch of fresh constraints at the start of the schema."""
    fmt = OutputFormat("json_schema", json.dumps(SCHEMA), "bench")
    constraints = [compiler.constraint(fmt) for _ in range(batch)]
    logits = torch.randn(batch, vocab)
    constrain(list(constraints), logits)
    start = time.perf_counter()
    for _ in range(reps):
        constrain(list(constraints), logits)
    return (time.perf_counter() - start) / (reps * batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokenizer-files", type=int, default=600, help="stdlib .py files to train the tokenizer on")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens per request")
    p.add_argument("--rounds", type=int, default=3, help="interleaved plain/constrained pairs per batch size")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    tokenizer = stdlib_tokenizer(args.vocab, args.tokenizer_files)
    vocab = tokenizer.get_vocab_size()
    print(f"tokenizer: {vocab} tokens, trained in {time.perf_counter() - t:.1f} s")
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(tiny().replace(vocab_size=vocab)).eval()
    compiler = GrammarCompiler(tokenizer, vocab, EOS)
    t = time.perf_counter()
    compiler.constraint(OutputFormat("json_schema", json.dumps(SCHEMA), "bench"))
    first = time.perf_counter() - t
    t = time.perf_counter()
    compiler.constraint(OutputFormat("json_schema", json.dumps(SCHEMA), "bench"))
    compile_s = time.perf_counter() - t
    prompt = tokenizer.encode("Write a list of names:").ids

    rows = []
    for batch in args.batch:
        plain, constrained = [], []
        for _ in range(args.rounds):
            for arm, out in ((None, plain), (compiler, constrained)):
                s = Scheduler(model, SchedulerConfig(max_batch_size=batch, kv_cache_bytes=1 << 26))
                out.append(decode_seconds_per_token(s, prompt, batch, args.tokens, arm))
        mask = mask_seconds_per_row(compiler, batch, vocab, reps=50)
        p50, c50 = statistics.median(plain), statistics.median(constrained)
        rows.append({"batch": batch, "plain_ms_per_token": p50 * 1e3, "constrained_ms_per_token": c50 * 1e3,
                     "overhead_ms_per_token": (c50 - p50) * 1e3, "overhead_pct": 100 * (c50 / p50 - 1),
                     "mask_us_per_row": mask * 1e6})

    print(f"first structured request (tokenizer for llguidance + compile): {first * 1e3:.0f} ms; "
          f"compile alone: {compile_s * 1e3:.1f} ms")
    print(f"{'batch':>5} {'plain ms/tok':>13} {'json ms/tok':>12} {'overhead ms':>12} {'overhead %':>11} "
          f"{'mask us/row':>12}")
    for r in rows:
        print(f"{r['batch']:>5} {r['plain_ms_per_token']:>13.3f} {r['constrained_ms_per_token']:>12.3f} "
              f"{r['overhead_ms_per_token']:>12.3f} {r['overhead_pct']:>10.1f}% {r['mask_us_per_row']:>12.1f}")
    load = uptime()
    print(load)
    print(json.dumps({"benchmark": "serve_structured", "vocab": vocab, "tokens": args.tokens,
                      "rounds": args.rounds, "threads": args.threads, "first_request_ms": first * 1e3,
                      "compile_ms": compile_s * 1e3, "rows": rows, "uptime": load}))


if __name__ == "__main__":
    main()
