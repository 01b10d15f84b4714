"""Does device-limited routing bound the traffic of expert parallelism, and what does the step cost?

On N CPU processes (gloo, one thread each, one expert group per rank), for M = 1, 2 and N (no limit): bytes each
token costs (dispatch + combine, self-sends excluded, averaged over ranks), the ranks it reaches, and the median
forward+backward time of one MoE layer (the slowest rank's). The bound that must hold in the numbers:
bytes/token <= min(M, N) * (dispatch row bytes + combine row bytes), since a token is sent at most once to each of
at most M ranks however many of its experts live there. "per-expert" is what one row per (token, expert) would
cost. Step times with N above the core count are oversubscribed: compare rows of one N, not across N.

    python benchmarks/expert_parallel.py [--worlds 2 4] [--tokens 512] [--reps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank per step")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--inter", type=int, default=128)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def limits(world: int) -> list[int]:
    return sorted({1, min(2, world), world})


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from deepseek_moe import MoE, MoEConfig
    from deepseek_moe.parallel import init_parallel, parallelize_experts

    torch.set_num_threads(1)
    ctx = init_parallel(timeout_s=60)
    world, rank = ctx.world_size, ctx.rank
    rows = []
    for m in limits(world):
        cfg = MoEConfig(dim=args.dim, moe_inter_dim=args.inter, n_routed_experts=args.experts,
                        n_activated_experts=args.top_k, n_shared_experts=1, n_expert_groups=world,
                        n_limited_groups=m, expert_loss_alpha=0.0)
        torch.manual_seed(0)
        moe = parallelize_experts(MoE(cfg).train(), ctx)
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(1, args.tokens, args.dim, generator=g)
        up = torch.randn_like(x)
        times = []
        for i in range(args.reps + 2):
            dist.barrier(group=ctx.ep_group)
            start = time.perf_counter()
            moe(x.requires_grad_()).backward(up)
            elapsed = time.perf_counter() - start
            moe.zero_grad(set_to_none=True)
            if i == 1:
                moe.dispatcher.reset_stats()  # count the timed steps only
            if i >= 2:
                times.append(elapsed)
        s = moe.dispatcher.stats
        k = min(args.top_k, args.experts // world)
        dispatch_row = (args.dim + k) * 4 + k * 4  # x + gates (fp32), expert ids
        combine_row = args.dim * 4
        totals = torch.tensor([s.dispatch_bytes, s.combine_bytes, s.tokens, s.rows_sent, s.rows_sent_remote,
                               s.assignments_remote, s.max_ranks_per_token], dtype=torch.float64)
        dist.all_reduce(totals[:6], group=ctx.ep_group)
        peak = totals[6:].clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=ctx.ep_group)
        step = torch.tensor([statistics.median(times)], dtype=torch.float64)
        dist.all_reduce(step, op=dist.ReduceOp.MAX, group=ctx.ep_group)
        tokens = float(totals[2])
        rows.append({"world": world, "M": m, "bytes_per_token": float(totals[0] + totals[1]) / tokens,
                     "dispatch_bytes_per_token": float(totals[0]) / tokens,
                     "combine_bytes_per_token": float(totals[1]) / tokens,
                     "bound_bytes_per_token": min(m, world) * (dispatch_row + combine_row),
                     "ranks_per_token": float(totals[3]) / tokens, "max_ranks_per_token": int(peak[0]),
                     "remote_rows_per_token": float(totals[4]) / tokens,
                     # what one row per (token, expert) would cost: the rows a token-once dispatch saves
                     "per_expert_bytes_per_token": float(totals[5]) / tokens * (dispatch_row + combine_row),
                     "step_ms": 1e3 * float(step[0])})
    if rank == 0:
        print("RESULT " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


def launch(world: int, args: argparse.Namespace) -> list[dict[str, float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, os.path.abspath(__file__), "--worker", "--tokens", str(args.tokens), "--dim",
            str(args.dim), "--inter", str(args.inter), "--experts", str(args.experts), "--top-k", str(args.top_k),
            "--reps", str(args.reps)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={
        **os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}) for r in range(world)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"benchmark ranks failed on {world} processes: exit codes {[p.returncode for p in procs]}")
    line = next(line for line in outs[0].splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    rows = [row for world in args.worlds for row in launch(world, args)]
    print(f"{args.tokens} tokens/rank, dim {args.dim}, {args.experts} experts top-{args.top_k} in one group per "
          f"rank, 1 shared, fp32, gloo on CPU, 1 thread/rank, median of {args.reps} fwd+bwd steps")
    print(f"{'N':>2} {'M':>2} {'ranks/tok':>9} {'max':>4} {'dispatch B/tok':>14} {'combine B/tok':>13} "
          f"{'total B/tok':>11} {'bound B/tok':>11} {'ok':>3} {'per-expert B/tok':>16} {'step ms':>8}")
    for r in rows:
        ok = r["bytes_per_token"] <= r["bound_bytes_per_token"] and r["max_ranks_per_token"] <= r["M"]
        r["bound_holds"] = ok
        print(f"{r['world']:>2} {r['M']:>2} {r['ranks_per_token']:>9.2f} {r['max_ranks_per_token']:>4} "
              f"{r['dispatch_bytes_per_token']:>14.0f} {r['combine_bytes_per_token']:>13.0f} "
              f"{r['bytes_per_token']:>11.0f} {r['bound_bytes_per_token']:>11.0f} {'yes' if ok else 'NO':>3} "
              f"{r['per_expert_bytes_per_token']:>16.0f} {r['step_ms']:>8.1f}")
    print(json.dumps({"benchmark": "expert_parallel", "tokens_per_rank": args.tokens, "dim": args.dim,
                      "experts": args.experts, "top_k": args.top_k, "reps": args.reps, "rows": rows,
                      "bound_holds": all(r["bound_holds"] for r in rows)}))
    if not all(r["bound_holds"] for r in rows):
        raise SystemExit("the traffic bound did not hold")


if __name__ == "__main__":
    main()
