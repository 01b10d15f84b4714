"""Batch-1 decode and 64-token prefill of the random mid-size model (404M, benchmarks/common.py), fp32 and bf16,
on the plain PyTorch paths (``deepseek_moe.kernels.switch.reference_paths()``) and on the fast ones (the float/bf16
kernels of kernels/float_gemm.cpp, the fused experts, the fused absorbed attention), side by side in one process,
interleaved, repeated: the machine may be shared, so compare ratios within a repeat.

    python benchmarks/decode_paths.py [--tokens 16] [--repeats 3] [--threads 2] [--dtypes float32 bfloat16]
    python benchmarks/decode_paths.py --threads 1 --clock cpu    # this thread's CPU time: steadier when shared

``--clock cpu`` counts only the CPU time of the calling thread, so time spent waiting for a core another
process holds is left out; it needs ``--threads 1`` (the work of other threads would not be counted).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import mid_size, uptime  # noqa: E402

import deepseek_moe as dm  # noqa: E402
from deepseek_moe.kernels import float_matmul  # noqa: E402
from deepseek_moe.kernels.switch import reference_paths  # noqa: E402

PATHS = ("plain", "fast")


CLOCK = time.perf_counter


def decode_tok_s(model: torch.nn.Module, prompt: torch.Tensor, n: int) -> float:
    cache = model.new_cache()
    tok = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
    tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)  # warm-up step
    t0 = CLOCK()
    for _ in range(n):
        tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)
    return n / (CLOCK() - t0)


def prefill_tok_s(model: torch.nn.Module, prompt: torch.Tensor) -> float:
    t0 = CLOCK()
    model(prompt)
    return prompt.shape[1] / (CLOCK() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed per measurement")
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()
    if args.clock == "cpu":
        if args.threads != 1:
            ap.error("--clock cpu needs --threads 1: other threads' work would not be counted")
        global CLOCK
        CLOCK = time.thread_time
    torch.set_num_threads(args.threads)
    print(uptime())
    with torch.device("meta"):
        base = dm.DeepSeekMoEForCausalLM(mid_size())
    base.to_empty(device="cpu")
    base.reset_parameters()
    base.eval()
    models = {d: base if d == "float32" else copy.deepcopy(base).to(getattr(torch, d)) for d in args.dtypes}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, base.config.vocab_size, (1, 16), generator=g)
    long_prompt = torch.randint(0, base.config.vocab_size, (1, args.prefill), generator=g)
    results: dict[str, dict[str, dict[str, list[float]]]] = {
        d: {p: {"decode": [], "prefill": []} for p in PATHS} for d in models}
    loads = []
    with torch.inference_mode():
        for model in models.values():  # warm-up: kernel builds, allocator, absorbed matrices
            for p in PATHS:
                with reference_paths(p == "plain"):
                    decode_tok_s(model, prompt, 1)
                    prefill_tok_s(model, long_prompt[:, :8])
        for rep in range(args.repeats):
            for d, model in models.items():
                for p in PATHS:
                    with reference_paths(p == "plain"):
                        results[d][p]["decode"].append(decode_tok_s(model, prompt, args.tokens))
                        results[d][p]["prefill"].append(prefill_tok_s(model, long_prompt))
            loads.append(uptime())
            print(f"repeat {rep + 1}/{args.repeats}: {loads[-1]}", flush=True)
    med = {d: {p: {k: statistics.median(v) for k, v in r.items()} for p, r in pr.items()} for d, pr in results.items()}
    print(f"\nmid-size model, batch 1, {args.threads} threads, float_gemm ISA {float_matmul.kernel_isa()}; medians of "
          f"{args.repeats} interleaved repeats (tokens/s, {args.clock} clock)")
    print(f"{'dtype':10s} {'path':6s} {'decode':>8s} {'prefill':>8s} {'decode fast/plain':>18s} {'prefill fast/plain':>19s}")
    for d in models:
        for p in PATHS:
            m, pl = med[d][p], med[d]["plain"]
            print(f"{d:10s} {p:6s} {m['decode']:8.2f} {m['prefill']:8.1f} {m['decode'] / pl['decode']:18.2f} "
                  f"{m['prefill'] / pl['prefill']:19.2f}")
    # Per repeat ratios, so the load of one moment cancels.
    ratios: dict[str, list[float]] = {}
    for d in models:
        for k in ("decode", "prefill"):
            ratios[f"{d} {k} fast/plain"] = [f / p for f, p in zip(results[d]["fast"][k], results[d]["plain"][k],
                                                                        strict=True)]
    if "float32" in models:
        for d in models:
            if d != "float32":
                for p in PATHS:
                    for k in ("decode", "prefill"):
                        ratios[f"{d}/float32 {p} {k}"] = [
                            a / b for a, b in zip(results[d][p][k], results["float32"][p][k], strict=True)]
    print("\nratios per repeat:")
    for name, r in ratios.items():
        print(f"  {name:32s} " + " ".join(f"{x:5.2f}" for x in r))
    print(json.dumps({"benchmark": "decode_paths", "threads": args.threads, "clock": args.clock, "isa": float_matmul.kernel_isa(),
                      "tok_s": results, "ratios": ratios, "load": loads}))


if __name__ == "__main__":
    main()
