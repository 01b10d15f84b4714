"""Does device-limited routing bound the traffic of expert parallelism, what does the step cost, and does each
rank hold the memory our counting says?

On N CPU processes (gloo, one thread each, one expert group per rank), for M = 1, 2 and N (no limit): bytes each
token costs (dispatch + combine, self-sends excluded, averaged over ranks), the ranks it reaches, and the median
forward+backward time of one MoE layer (the slowest rank's). The bound that must hold in the numbers:
bytes/token <= min(M, N) * (dispatch row bytes + combine row bytes), since a token is sent at most once to each of
at most M ranks however many of its experts live there. "per-expert" is what one row per (token, expert) would
cost. Step times with N above the core count are oversubscribed: compare rows of one N, not across N.

Memory (``--parts memory``): a fixed model (:func:`memory_model`, 53M parameters) built on meta, wrapped by
``parallel.shard_model`` (experts over "ep", FSDP2 over the rest of the mesh), materialised, one AdamW step
(fp32, one thread per rank) on 1, 2 and 4 ranks (and ep = 2 on 4; and 4 with activation checkpointing): per rank, the parameter, gradient and
optimizer bytes held by the actual shards (the DTensors' local tensors, AdamW's state after the step) against
``model.memory.sharded_state``, which must match exactly; and the peak RSS above the post-import baseline against
the estimated peak (sharded state + FSDP transient + activations, ``model.memory``).

    python benchmarks/expert_parallel.py [--worlds 2 4] [--tokens 512] [--reps 10] [--parts traffic memory]
        [--memory-layouts 1 2 4 4:2]
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
    parser.add_argument("--parts", nargs="+", choices=["traffic", "memory"], default=["traffic", "memory"])
    parser.add_argument("--memory-layouts", nargs="+", default=["1", "2", "4", "4:2", "4+ckpt"],
                        help="N[:ep][+ckpt] for the memory part: ep defaults to the automatic choice; +ckpt turns "
                        "activation checkpointing per block on")
    parser.add_argument("--memory-batch", type=int, default=2, help="sequences per rank in the memory step")
    parser.add_argument("--memory-seq", type=int, default=256)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ep", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def memory_model():  # noqa: ANN201  (a ModelConfig; imported lazily, after the RSS baseline)
    """53M parameters, 38M of them routed experts: 16 experts of width 512 in 4 groups (ep 1, 2 or 4), MLA."""
    from deepseek_moe.config import ModelConfig, MoEConfig

    dim = 512
    return ModelConfig(
        vocab_size=4096, dim=dim, inter_dim=1536, n_layers=4, n_dense_layers=1, n_heads=8, q_lora_rank=128,
        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_seq_len=512,
        original_seq_len=512,
        moe=MoEConfig(dim=dim, moe_inter_dim=512, n_routed_experts=16, n_activated_experts=4, n_shared_experts=1,
                      n_expert_groups=4, n_limited_groups=2))


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, KiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_worker(args: argparse.Namespace) -> None:
    import torch

    from deepseek_moe.model.block import set_activation_checkpointing
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
    from deepseek_moe.parallel import auto_ep, init_parallel, local_shard, materialize, shard_model
    from deepseek_moe.train.config import OptimConfig
    from deepseek_moe.train.optim import build_optimizer

    baseline = rss_kib("VmRSS")  # after the imports: what any rank pays before holding a model
    import torch.distributed as dist

    from deepseek_moe.model.activations import activation_bytes
    from deepseek_moe.model.memory import FP32, MeshLayout, sharded_state, transient_bytes

    torch.set_num_threads(1)
    cfg = memory_model()
    world = int(os.environ["WORLD_SIZE"])
    ctx = init_parallel(args.ep or auto_ep(world, [cfg.moe]), timeout_s=120)
    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(cfg, init_seed=0)
    shard_model(model, ctx)
    materialize(model, ctx.device)
    set_activation_checkpointing(model, args.ckpt)
    optimizer = build_optimizer(model, OptimConfig())
    g = torch.Generator().manual_seed(ctx.rank)
    ids = torch.randint(0, cfg.vocab_size, (args.memory_batch, args.memory_seq), generator=g)
    model.train()
    for _ in range(2):  # the second step runs with the optimizer's state allocated: the steady-state peak
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimizer.step()

    def local_bytes(t: torch.Tensor) -> int:
        local = local_shard(t)[0]
        return local.numel() * local.element_size()

    params = list(model.parameters())
    held = {"params": sum(local_bytes(p) for p in params),
            "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                             if isinstance(v, torch.Tensor))}
    mesh = MeshLayout(world=world, ep=ctx.ep_size)
    theory = sharded_state(cfg, mesh, FP32, ctx.rank)
    tokens = args.memory_batch * args.memory_seq
    estimate = (theory.total_bytes + transient_bytes(cfg, mesh, FP32)
                + activation_bytes(cfg, tokens=tokens, compute=4, checkpointing=args.ckpt, sdpa_pads_v=True))
    row = {"world": world, "ep": ctx.ep_size, "checkpointing": args.ckpt, "rank": ctx.rank, **{f"{k}_bytes": v for k, v in held.items()},
           "theory_params_bytes": theory.param_bytes, "theory_grads_bytes": theory.grad_bytes,
           "theory_optimizer_bytes": theory.optimizer_bytes, "peak_rss_above_baseline_bytes":
           1024 * (rss_kib("VmHWM") - baseline), "baseline_rss_bytes": 1024 * baseline,
           "estimated_peak_bytes": estimate}
    rows: list[dict | None] = [None] * world
    dist.all_gather_object(rows, row)
    if ctx.rank == 0:
        print("RESULT " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


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


def launch(world: int, args: argparse.Namespace, *, memory_ep: int | None = None,
           ckpt: bool = False) -> list[dict[str, float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, os.path.abspath(__file__), "--worker", "--tokens", str(args.tokens), "--dim",
            str(args.dim), "--inter", str(args.inter), "--experts", str(args.experts), "--top-k", str(args.top_k),
            "--reps", str(args.reps)]
    if memory_ep is not None:
        argv = [sys.executable, os.path.abspath(__file__), "--memory-worker", "--ep", str(memory_ep),
                "--memory-batch", str(args.memory_batch), "--memory-seq", str(args.memory_seq)]
        argv += ["--ckpt"] if ckpt else []
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={
        **os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
        # glibc: large blocks always mmap-ed and unmapped when freed (no dynamic threshold), so the peak RSS
        # follows the tensors alive rather than what the heap kept
        "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}) for r in range(world)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"benchmark ranks failed on {world} processes: exit codes {[p.returncode for p in procs]}")
    line = next(line for line in outs[0].splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def traffic(args: argparse.Namespace) -> dict:
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
    return {"tokens_per_rank": args.tokens, "dim": args.dim, "experts": args.experts, "top_k": args.top_k,
            "reps": args.reps, "rows": rows, "bound_holds": all(r["bound_holds"] for r in rows)}


def memory(args: argparse.Namespace) -> dict:
    """Launch each layout, print the per-rank table; the counted shards must equal the theory exactly."""
    from deepseek_moe.model.counting import count_parameters

    rows = []
    for layout in args.memory_layouts:
        shape, _, flag = layout.partition("+")
        if flag not in ("", "ckpt"):
            raise SystemExit(f"--memory-layouts: {layout!r} is not N[:ep][+ckpt]")
        world, _, ep = shape.partition(":")
        rows += launch(int(world), args, memory_ep=int(ep) if ep else 0, ckpt=flag == "ckpt")
    total, _ = count_parameters(memory_model())
    mb = 1e6
    print(f"\nmemory: {total / 1e6:.1f}M-parameter model (memory_model()), fp32, AdamW, one step of "
          f"{args.memory_batch} x {args.memory_seq} tokens per rank, gloo on CPU, 1 thread/rank; MB = 1e6 bytes")
    print(f"{'N':>2} {'ep':>2} {'ckpt':>4} {'rank':>4} {'params MB':>9} {'theory':>8} {'grads MB':>8} {'theory':>8} "
          f"{'optim MB':>8} {'theory':>8} {'exact':>5} {'RSS peak-base MB':>16} {'estimate MB':>11}")
    for r in rows:
        r["exact"] = all(r[f"{k}_bytes"] == r[f"theory_{k}_bytes"] for k in ("params", "grads", "optimizer"))
        print(f"{r['world']:>2} {r['ep']:>2} {'yes' if r['checkpointing'] else 'no':>4} {r['rank']:>4} "
              f"{r['params_bytes'] / mb:>9.2f} "
              f"{r['theory_params_bytes'] / mb:>8.2f} {r['grads_bytes'] / mb:>8.2f} {r['theory_grads_bytes'] / mb:>8.2f} "
              f"{r['optimizer_bytes'] / mb:>8.2f} {r['theory_optimizer_bytes'] / mb:>8.2f} "
              f"{'yes' if r['exact'] else 'NO':>5} {r['peak_rss_above_baseline_bytes'] / mb:>16.1f} "
              f"{r['estimated_peak_bytes'] / mb:>11.1f}")
    return {"model_parameters": total, "batch": args.memory_batch, "seq_len": args.memory_seq, "rows": rows,
            "exact": all(r["exact"] for r in rows)}


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    if args.memory_worker:
        memory_worker(args)
        return
    from common import uptime

    record: dict = {"benchmark": "expert_parallel", "uptime": uptime()}
    if "traffic" in args.parts:
        record.update(traffic(args))
    if "memory" in args.parts:
        record["memory"] = memory(args)
    print(f"uptime: {record['uptime']}")
    print(json.dumps(record))
    if not record.get("bound_holds", True):
        raise SystemExit("the traffic bound did not hold")
    if not record.get("memory", {}).get("exact", True):
        raise SystemExit("the shards do not hold what model.memory counts")


if __name__ == "__main__":
    main()
