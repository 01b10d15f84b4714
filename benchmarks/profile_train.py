"""Where a training step's time goes: forward / backward / optimizer wall time, and the top aten operations
(torch.profiler, self CPU time) of our model's step at the tiny or mid size, fp32 or bf16 autocast.

``--layers`` shrinks the mid size (same widths, fewer MoE layers) so the profile fits in a few GB: every
MoE layer is alike, so the per-op shares barely move.

Under bf16 the model gets compute copies and AdamWCopies, as ``deepseek-moe train`` runs it
(``--no-compute-copies``: autocast's casts and torch's AdamW).

    python benchmarks/profile_train.py --size mid --dtype bf16 [--layers 3] [--steps 3] [--top 25]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mid_size, uptime  # noqa: E402

import deepseek_moe as dm  # noqa: E402
from deepseek_moe.device import keep_freed_memory  # noqa: E402
from deepseek_moe.nn.compute_copy import attach as attach_compute_copies  # noqa: E402
from deepseek_moe.presets import tiny  # noqa: E402
from deepseek_moe.train.optim import adamw_class  # noqa: E402

SIZES = {"tiny": (tiny, 16, 256), "mid": (mid_size, 4, 256)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="mid")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--layers", type=int, default=0, help="number of layers (0: the size's own)")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--malloc-defaults", action="store_true", help="leave glibc malloc's defaults")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    ap.add_argument("--no-compute-copies", action="store_true",
                    help="bf16 without compute copies (autocast casts each weight every step; torch's AdamW)")
    args = ap.parse_args()
    if not args.malloc_defaults:
        keep_freed_memory()  # as deepseek-moe train does
    if args.threads:
        torch.set_num_threads(args.threads)
    make, B, S = SIZES[args.size]
    cfg = make()
    if args.layers:
        cfg = dataclasses.replace(cfg, n_layers=args.layers)
    torch.manual_seed(0)
    model = dm.DeepSeekMoEForCausalLM(cfg).train()
    amp = args.dtype == "bf16"
    if amp and not args.no_compute_copies:  # as deepseek-moe train runs bf16
        attach_compute_copies(model)
    opt = adamw_class(model)(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    batch = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))

    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}

    def step() -> None:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if amp else nullcontext():
            loss = model(batch, labels=batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        for k, t in zip(phases, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            phases[k].append(t)

    print(uptime())
    for _ in range(args.warmup):  # the first steps grow the heap (page faults) until it holds a step's tensors
        step()
    for v in phases.values():
        v.clear()
    for _ in range(args.steps):  # unprofiled: the wall times
        step()
    med = {k: statistics.median(v) for k, v in phases.items()}
    total = sum(med.values())
    print(f"{args.size} ({cfg.n_layers} layers, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M), "
          f"batch {B} x {S}, {args.dtype}, {torch.get_num_threads()} threads: {B * S / total:,.0f} tokens/s")
    for k, v in med.items():
        print(f"  {k:10s} {v:7.3f} s  {100 * v / total:5.1f}%")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    self_total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    print(f"\ntop {args.top} ops by self CPU time (per step; share of all self time)")
    print(f"{'op':<48s} {'ms/step':>9s} {'share':>7s} {'calls':>7s}")
    for e in rows:
        print(f"{e.key[:48]:<48s} {e.self_cpu_time_total / 1e3 / args.steps:9.1f} "
              f"{100 * e.self_cpu_time_total / self_total:6.1f}% {e.count // args.steps:7d}")
    print(uptime())
    print(json.dumps({"benchmark": "profile_train", "size": args.size, "layers": cfg.n_layers, "dtype": args.dtype,
                      "threads": torch.get_num_threads(), "tokens_per_s": B * S / total,
                      "phases_s": med, "top": {e.key: round(e.self_cpu_time_total / 1e3 / args.steps, 2)
                                               for e in rows}}))


if __name__ == "__main__":
    main()
