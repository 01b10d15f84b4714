"""What does multi-token prediction cost in training tokens/s? The tiny preset's default-run step (batch 16 x 256,
fp32 as on a CPU without native bf16, the run's AdamW) with mtp_depth 0 and 1, side by side.

Both models start from the same initialisation seed (the main model's parameters are equal); rounds alternate
between them on the same batch, each round a few optimizer steps (forward with labels, backward with the MTP
loss weighted by V3's first λ 0.3, clip, AdamW, zero_grad). Tokens/s counts the main model's tokens (what the run
reports), the median over rounds. The machine is shared: the load average is printed with the numbers.

    python benchmarks/mtp_train_cost.py [--rounds 5] [--steps 3] [--threads 2] [--depths 0 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import uptime  # noqa: E402

from deepseek_moe.device import keep_freed_memory  # noqa: E402
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM  # noqa: E402
from deepseek_moe.presets import tiny  # noqa: E402
from deepseek_moe.train.config import OptimConfig  # noqa: E402
from deepseek_moe.train.optim import build_optimizer  # noqa: E402

BATCH, SEQ, LAMBDA = 16, 256, 0.3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as deepseek-moe train does

    ids = torch.randint(0, tiny().vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    runs = {}
    for depth in args.depths:
        model = DeepSeekMoEForCausalLM(tiny().replace(mtp_depth=depth), init_seed=0).train()
        runs[depth] = (model, build_optimizer(model, OptimConfig()))

    def step(model: DeepSeekMoEForCausalLM, opt: torch.optim.Optimizer) -> None:
        out = model(ids, labels=ids, mtp_lambda=LAMBDA)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for model, opt in runs.values():  # warm-up: allocator, first-call costs
        step(model, opt)
    tps: dict[int, list[float]] = {d: [] for d in runs}
    for _ in range(args.rounds):
        for depth, (model, opt) in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(model, opt)
            tps[depth].append(args.steps * BATCH * SEQ / (time.perf_counter() - t0))

    load = uptime()
    base = statistics.median(tps[args.depths[0]])
    params = {d: sum(p.numel() for p in m.parameters()) for d, (m, _) in runs.items()}
    print(f"tiny preset, batch {BATCH} x {SEQ}, fp32, {args.threads} threads, {args.rounds} rounds x {args.steps} "
          f"steps; {load}")
    print(f"{'mtp_depth':>9} {'params (M)':>10} {'tokens/s (median)':>18} {'min':>8} {'max':>8} "
          f"{'vs depth ' + str(args.depths[0]):>12}")
    for d in runs:
        med = statistics.median(tps[d])
        print(f"{d:>9} {params[d] / 1e6:>10.2f} {med:>18,.0f} {min(tps[d]):>8,.0f} {max(tps[d]):>8,.0f} "
              f"{med / base:>12.3f}")
    print(json.dumps({"benchmark": "mtp_train_cost", "batch": BATCH, "seq_len": SEQ, "threads": args.threads,
                      "rounds": args.rounds, "steps_per_round": args.steps, "uptime": load,
                      "tokens_per_s": {str(d): statistics.median(v) for d, v in tps.items()},
                      "tokens_per_s_all": {str(d): v for d, v in tps.items()},
                      "params": {str(d): n for d, n in params.items()}}))


if __name__ == "__main__":
    main()
