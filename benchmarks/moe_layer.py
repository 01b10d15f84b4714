"""How close is the MoE layer to a dense FFN of the same activated width?

(a) our layer, (b) a dense SwiGLU FFN of width (K + K_s) * F (the limit: same FLOPs, no routing), (c) the naive
loop found in tutorials (for each expert: mask, run, add). Interleaved in one process, median of repeats.
Also (a) with 16 and 160 routed experts at the same activated width. In fp32 and under bf16 autocast (where
routing, gathers and combines do not speed up as the matrix products do).

The process keeps freed memory (``deepseek_moe.device.keep_freed_memory``, as training does) unless
``--malloc-defaults``; under bf16 every layer's weights get compute copies and their gradients' memory is kept for
the next backward (``deepseek_moe.nn.compute_copy``, as training does) unless ``--no-compute-copies``.

    python benchmarks/moe_layer.py [--reps 20] [--threads 2] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe import MoE, MoEConfig
from deepseek_moe.device import keep_freed_memory
from deepseek_moe.moe.experts import FeedForward
from deepseek_moe.nn.compute_copy import attach as attach_compute_copies
from deepseek_moe.nn.compute_copy import park_grads


class NaiveMoE(nn.Module):
    """The tutorial loop over experts, sharing ``moe``'s weights: mask the tokens of each expert, run, add."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moe = self.moe
        x_TD = x.reshape(-1, x.shape[-1])
        routing = moe.gate(x_TD)
        y = torch.zeros_like(x_TD)
        for e in range(moe.cfg.n_routed_experts):
            token, slot = (routing.indices_TK == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            w1, w2, w3 = moe.experts.w1[e], moe.experts.w2[e], moe.experts.w3[e]
            h = F.silu(x_TD[token] @ w1.t()) * (x_TD[token] @ w3.t())
            y = y.index_add(0, token, (h @ w2.t()) * routing.weights_TK[token, slot, None])
        if moe.shared_experts is not None:
            y = y + moe.shared_experts(x_TD)
        return y.view(x.shape)


def make_layer(n_experts: int, k: int, args: argparse.Namespace) -> MoE:
    cfg = MoEConfig(dim=args.dim, moe_inter_dim=args.inter, n_routed_experts=n_experts, n_activated_experts=k,
                    n_shared_experts=2, expert_loss_alpha=0.0)
    return MoE(cfg).train()


def timer(fn: Callable[[], None]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                        help="bf16: everything under bf16 autocast (fp32 weights), as training runs it")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--no-compute-copies", action="store_true",
                        help="bf16 without the weights' bf16 compute copies (autocast casts every weight each pass)")
    parser.add_argument("--malloc-defaults", action="store_true", help="leave glibc malloc's defaults")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.malloc_defaults:
        keep_freed_memory()
    torch.manual_seed(0)

    x = torch.randn(4, args.tokens // 4, args.dim)
    upstream = torch.randn_like(x)  # a fixed, dense upstream gradient (grouped_mm rejects stride-0 ones)
    layers: dict[str, nn.Module] = {
        "moe_64": make_layer(64, 6, args),
        "dense": FeedForward(args.dim, (6 + 2) * args.inter),
        "moe_16": make_layer(16, 6, args),
        "moe_160": make_layer(160, 6, args),
    }
    if not args.skip_naive:
        layers["naive_64"] = NaiveMoE(layers["moe_64"])  # type: ignore[arg-type]
    result: dict[str, object] = {"benchmark": "moe_layer", "tokens": args.tokens, "threads": args.threads,
                                 "reps": args.reps, "keep_freed_memory": not args.malloc_defaults}
    for dtype in args.dtypes:
        if dtype == "bf16" and not args.no_compute_copies:  # as deepseek-moe train runs bf16
            for layer in layers.values():
                attach_compute_copies(layer)
        result[dtype] = bench(layers, x, upstream, dtype == "bf16", args)
    print(json.dumps(result))


def bench(layers: dict[str, nn.Module], x: torch.Tensor, upstream: torch.Tensor, amp: bool,
          args: argparse.Namespace) -> dict[str, object]:
    def precision() -> AbstractContextManager[object]:
        return torch.autocast("cpu", dtype=torch.bfloat16) if amp else nullcontext()

    def fwd(module: nn.Module) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad(), precision():
                module(x)
        return go

    def fwd_bwd(module: nn.Module) -> Callable[[], None]:
        def go() -> None:
            xg = x.detach().requires_grad_(True)
            with precision():
                y = module(xg)
            y.backward(upstream)
            park_grads(module.parameters())  # as the trainer's optimizer does: gradient memory kept for the next
            module.zero_grad(set_to_none=True)
        return go

    cases = {(name, mode): timer(make(mod)) for name, mod in layers.items()
             for mode, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd))}
    for run in cases.values():  # warm-up
        run()
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
    for _ in range(args.reps):  # interleaved: machine noise hits every case alike
        for key, run in cases.items():
            samples[key].append(run())

    med = {key: statistics.median(v) for key, v in samples.items()}
    print(f"tokens {args.tokens}, dim {args.dim}, expert width {args.inter}, top-6 + 2 shared, "
          f"{args.threads} threads, {'bf16 autocast' if amp else 'fp32'}, {args.reps} reps (median, [min, max] ms)")
    print(f"{'layer':<10} {'mode':<8} {'median ms':>10} {'range ms':>18} {'vs dense':>9}")
    for (name, mode), times in samples.items():
        ratio = med[(name, mode)] / med[("dense", mode)]
        print(f"{name:<10} {mode:<8} {1e3 * med[(name, mode)]:>10.1f} "
              f"{f'[{1e3 * min(times):.1f}, {1e3 * max(times):.1f}]':>18} {ratio:>8.2f}x")
    print()
    out: dict[str, object] = {"median_ms": {f"{n}/{m}": round(1e3 * t, 2) for (n, m), t in med.items()}}
    for mode in ("fwd", "fwd+bwd"):
        for n in (16, 64, 160):
            out[f"ratio_{n}_vs_dense_{mode}"] = round(med[(f"moe_{n}", mode)] / med[("dense", mode)], 3)
        out[f"ratio_160_vs_64_{mode}"] = round(med[("moe_160", mode)] / med[("moe_64", mode)], 3)
    if "naive_64" in layers:
        out["ratio_naive_vs_dense_fwd_bwd"] = round(med[("naive_64", "fwd+bwd")] / med[("dense", "fwd+bwd")], 3)
    return out


if __name__ == "__main__":
    main()
