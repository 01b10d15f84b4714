"""Where a decode step's time goes: inclusive time per module type, time inside the C++ kernels, and the
top aten operations (torch.profiler), for one checkpoint at batch 1.

    python benchmarks/profile_decode.py CHECKPOINT [--dtype float32] [--quantize int8] [--tokens 16]
    python benchmarks/profile_decode.py --mid --quantize int8      # random mid-size model, quantised in memory
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import mid_size, uptime  # noqa: E402

import deepseek_moe as dm  # noqa: E402
from deepseek_moe.kernels import cpu_build  # noqa: E402
from deepseek_moe.kernels import quant_matmul as qm  # noqa: E402

TIMED = ("MLA", "MHA", "MoE", "Router", "QuantRoutedExperts", "RoutedExperts", "FeedForward", "QuantLinear",
         "Linear", "RMSNorm", "Embedding")


class _TimedLibrary:
    """Wraps the ctypes library so every kernel call is timed."""

    def __init__(self, lib: Any, acc: collections.Counter[str], calls: collections.Counter[str]) -> None:
        self.lib, self.acc, self.calls = lib, acc, calls

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.lib, name)

        def timed(*args: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args)
            self.acc[name] += time.perf_counter() - t0
            self.calls[name] += 1
            return out
        return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--mid", action="store_true", help="a random mid-size model instead of a checkpoint")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--quantize", default=None, help="int8 / int4")
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    print(uptime())
    if args.mid:
        from deepseek_moe.quant import QuantConfig, quantize_model

        with torch.device("meta"):
            model = dm.DeepSeekMoEForCausalLM(mid_size())
        model.to_empty(device="cpu")
        model.reset_parameters()
        model.eval()
        if args.dtype:
            model.to(getattr(torch, args.dtype))
        if args.quantize:
            quantize_model(model, QuantConfig(bits=8 if args.quantize == "int8" else 4))
    else:
        model = dm.from_pretrained(args.checkpoint, dtype=args.dtype, quantize=args.quantize)

    inclusive: collections.Counter[str] = collections.Counter()
    started: dict[int, float] = {}

    def pre(mod: torch.nn.Module, _: Any) -> None:
        started[id(mod)] = time.perf_counter()

    def post(mod: torch.nn.Module, _: Any, __: Any) -> None:
        inclusive[type(mod).__name__] += time.perf_counter() - started.pop(id(mod))

    for mod in model.modules():
        if type(mod).__name__ in TIMED:
            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)
    kernel: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    lib = cpu_build.load_library()
    if lib is not None:
        timed = _TimedLibrary(lib, kernel, calls)
        qm.load_library = lambda: timed  # type: ignore[assignment]

    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    n = args.tokens
    with torch.inference_mode():
        cache = model.new_cache()
        tok = model(ids, cache=cache).logits[:, -1:].argmax(-1)
        for _ in range(2):
            tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)
        inclusive.clear()
        kernel.clear()
        calls.clear()
        t0 = time.perf_counter()
        for _ in range(n):
            tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)
        step = (time.perf_counter() - t0) / n
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(4):
                tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)
    print(f"decode step {step * 1e3:.1f} ms ({1 / step:.1f} tok/s), {torch.get_num_threads()} threads")
    print("inclusive time per module type (nested types overlap):")
    for name, t in inclusive.most_common():
        print(f"  {name:20s} {t / n * 1e3:8.2f} ms  {100 * t / n / step:5.1f}%")
    for name, t in kernel.most_common():
        print(f"  kernel {name:13s} {t / n * 1e3:8.2f} ms  {100 * t / n / step:5.1f}%  ({calls[name] / n:.0f} calls)")
    aten = prof.key_averages()
    top = sorted(aten, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    print("top aten operations (self time per step, calls per step):")
    for e in top:
        print(f"  {e.key:28s} {e.self_cpu_time_total / 4 / 1e3:8.2f} ms  {e.count / 4:6.0f}")
    total_ops = sum(e.count for e in aten) / 4
    print(f"  aten operations per step: {total_ops:.0f}")
    print(uptime())
    print(json.dumps({"benchmark": "profile_decode", "step_ms": step * 1e3,
                      "modules_ms": {k: v / n * 1e3 for k, v in inclusive.items()},
                      "kernel_ms": {k: v / n * 1e3 for k, v in kernel.items()}, "aten_ops_per_step": total_ops}))


if __name__ == "__main__":
    main()
