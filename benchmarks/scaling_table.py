"""Memory per GPU and bytes per step of training DeepSeek-V2 (236B) and DeepSeek-V3 (671B) on 8 nodes x 8 H100
under our mesh, and the largest model that fits: the tables of docs/scaling.md, computed (not measured) by
deepseek_moe.model.memory, .activations and .traffic from the presets' shapes.

    python benchmarks/scaling_table.py                            # print the tables and one JSON line
    python benchmarks/scaling_table.py --write docs/scaling.md    # refresh the doc's tables in place
    python benchmarks/scaling_table.py --check docs/scaling.md    # exit 1 if the doc's tables are stale

The doc's prose is written by hand; each table sits between ``<!-- table: NAME -->`` and ``<!-- /table -->``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from deepseek_moe.config import ModelConfig
from deepseek_moe.model.activations import activation_bytes
from deepseek_moe.model.counting import count_parameters, flops_per_token
from deepseek_moe.model.memory import (
    BF16_MIXED,
    PRECISIONS,
    V3_RECIPE,
    MeshLayout,
    Precision,
    default_ep,
    estimate_memory,
    largest_unit,
)
from deepseek_moe.model.traffic import all_to_all, all_to_all_bytes, expected_ranks_per_token, fsdp_traffic
from deepseek_moe.presets import deepseek_v2, deepseek_v3

GiB = 2**30
NODES, GPUS_PER_NODE = 8, 8
CAPACITY = 81559 * 2**20  # an H100 SXM 80GB as nvidia-smi reports it (81,559 MiB)
HEADROOM = 0.90  # the rest: CUDA context, cuBLAS workspaces, NCCL buffers, allocator fragmentation
BATCH, SEQ_LEN = 1, 4096  # sequences per GPU per micro-batch; V2's and V3's pre-training context
FLOPS = 400e12  # sustained bf16 matmul rate assumed per H100 (about 40% of its dense peak)
IB_BYTES_PER_S = 50e9  # one 400 Gb/s InfiniBand port per GPU
MODELS: dict[str, Callable[[], ModelConfig]] = {"DeepSeek-V2": deepseek_v2, "DeepSeek-V3": deepseek_v3}


@dataclass(frozen=True)
class Setting:
    world: int = NODES * GPUS_PER_NODE
    batch: int = BATCH
    seq_len: int = SEQ_LEN
    budget: float = HEADROOM * CAPACITY

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def mesh_for(cfg: ModelConfig, s: Setting, ep: int | None = None) -> MeshLayout:
    return MeshLayout(world=s.world, ep=default_ep(cfg, s.world) if ep is None else ep)


def assumptions(s: Setting) -> str:
    rows = [[p.name, str(p.master), str(p.grad), str(p.moment), str(p.compute), str(p.reduce), p.description]
            for p in PRECISIONS.values()]
    prec = table(["precision", "master", "grad", "each moment", "gathered + activations", "reduce", "what"], rows)
    return (f"{prec}\n\nBytes per element. Cluster: {NODES} nodes x {GPUS_PER_NODE} GPUs = {s.world} ranks; "
            f"capacity {gib(CAPACITY)} GiB per GPU, budget {HEADROOM:.0%} of it = {gib(s.budget)} GiB. Micro-batch: "
            f"{s.batch} x {s.seq_len} tokens per GPU.")


def memory_rows(s: Setting) -> tuple[str, list[dict]]:
    rows, records = [], []
    for name, make in MODELS.items():
        cfg = make()
        mesh = mesh_for(cfg, s)
        total, activated = count_parameters(cfg)
        for precision in PRECISIONS.values():
            for ckpt in (False, True):
                est = estimate_memory(cfg, mesh, precision, batch=s.batch, seq_len=s.seq_len, checkpointing=ckpt)
                fits = est.total_bytes <= s.budget
                dim1 = estimate_memory(cfg, replace(mesh, expert_fsdp_dim=1), precision, batch=s.batch,
                                       seq_len=s.seq_len, checkpointing=ckpt).total_bytes
                rows.append([f"{name} ({total / 1e9:.0f}B, {activated / 1e9:.0f}B act.)", f"{mesh.dp_mod_ep}x{mesh.ep}",
                             precision.name, "yes" if ckpt else "no", gib(est.state.param_bytes),
                             gib(est.state.grad_bytes), gib(est.state.optimizer_bytes),
                             f"{gib(est.transient_bytes)} ({est.unit.name})", gib(est.activation_bytes),
                             f"**{gib(est.total_bytes)}**", "yes" if fits else "no", gib(dim1)])
                records.append({"model": name, "ep": mesh.ep, "precision": precision.name, "checkpointing": ckpt,
                                "params_gib": est.state.param_bytes / GiB, "grads_gib": est.state.grad_bytes / GiB,
                                "optimizer_gib": est.state.optimizer_bytes / GiB,
                                "transient_gib": est.transient_bytes / GiB,
                                "activations_gib": est.activation_bytes / GiB, "total_gib": est.total_bytes / GiB,
                                "total_experts_dim1_gib": dim1 / GiB,
                                "fits": fits})
    header = ["model", "mesh", "precision", "act. ckpt", "params", "grads", "optimizer", "transient (largest unit)",
              "activations", "total", "fits", "total, experts FSDP on dim 1"]
    return table(header, rows), records


def traffic_rows(s: Setting, precision: Precision) -> tuple[str, list[dict]]:
    rows, records = [], []
    for name, make in MODELS.items():
        cfg = make()
        mesh = mesh_for(cfg, s)
        per = all_to_all(cfg, mesh, precision, checkpointing=False)
        mean = {ck: all_to_all_bytes(cfg, mesh, precision, tokens=s.tokens, checkpointing=ck) for ck in (False, True)}
        bound = all_to_all_bytes(cfg, mesh, precision, tokens=s.tokens, checkpointing=False, bound=True)
        fsdp = fsdp_traffic(cfg, mesh, precision)
        # Training FLOPs: 3x the forward's, a token attending to seq_len / 2 keys on average.
        compute_s = 3 * flops_per_token(cfg, s.seq_len // 2) * s.tokens / FLOPS
        fsdp_s = fsdp.total_bytes / IB_BYTES_PER_S
        rows.append([name, f"{mesh.dp_mod_ep}x{mesh.ep}", f"{expected_ranks_per_token(cfg.moe, mesh.ep):.2f}",
                     f"{per.remote_ranks:.2f}", f"{per.bytes_per_token / 1e3:.0f}", gib(mean[False]), gib(mean[True]),
                     gib(bound), f"{gib(fsdp.all_gather_bytes)} ({gib(fsdp.expert_all_gather_bytes)})",
                     gib(fsdp.reduce_scatter_bytes), f"{fsdp_s:.1f}", f"{compute_s:.1f}"])
        records.append({"model": name, "ep": mesh.ep, "ranks_per_token": expected_ranks_per_token(cfg.moe, mesh.ep),
                        "remote_ranks_per_token": per.remote_ranks, "a2a_gib": mean[False] / GiB,
                        "a2a_ckpt_gib": mean[True] / GiB, "a2a_bound_gib": bound / GiB,
                        "all_gather_gib": fsdp.all_gather_bytes / GiB,
                        "expert_all_gather_gib": fsdp.expert_all_gather_bytes / GiB,
                        "reduce_scatter_gib": fsdp.reduce_scatter_bytes / GiB, "fsdp_s": fsdp_s,
                        "compute_s": compute_s})
    header = ["model", "mesh", "ranks/token", "remote ranks/token", "a2a kB/token/layer", "a2a GiB",
              "a2a GiB (ckpt)", "a2a GiB (bound)", "FSDP all-gather GiB (experts)", "FSDP reduce-scatter GiB",
              "FSDP s at 50 GB/s", "compute s at 400 TFLOP/s"]
    return table(header, rows), records


def ep_rows(s: Setting, precision: Precision) -> tuple[str, list[dict]]:
    """V3 at each ep our layout allows (ep divides the 8 groups and is at least M = 4, or 1), and DeepSeek's 64-way
    EP (as 64 groups of 4 experts, a token limited to 32 of them: its 4 nodes), which ours cannot run."""
    rows, records = [], []
    v3 = deepseek_v3()
    v3_64 = v3.replace(moe=v3.moe.replace(n_expert_groups=64, n_limited_groups=32))
    for ep, cfg in [(1, v3), (4, v3), (8, v3), (64, v3_64)]:
        mesh = MeshLayout(world=s.world, ep=ep)
        est = estimate_memory(cfg, mesh, precision, batch=s.batch, seq_len=s.seq_len, checkpointing=True)
        a2a = all_to_all_bytes(cfg, mesh, precision, tokens=s.tokens, checkpointing=True)
        fsdp = fsdp_traffic(cfg, mesh, precision)
        where = "NVLink (one node)" if ep <= GPUS_PER_NODE else f"IB ({ep // GPUS_PER_NODE} nodes)"
        rows.append([f"{ep}" + (" (DeepSeek-V3's; not ours)" if ep == 64 else ""), f"{cfg.moe.n_routed_experts // ep}",
                     f"{largest_unit(cfg, mesh).elements / 1e9:.2f}B", gib(est.transient_bytes),
                     f"**{gib(est.total_bytes)}**", f"{gib(a2a)} over {where}", gib(fsdp.expert_all_gather_bytes),
                     gib(fsdp.all_gather_bytes - fsdp.expert_all_gather_bytes)])
        records.append({"ep": ep, "transient_gib": est.transient_bytes / GiB, "total_gib": est.total_bytes / GiB,
                        "a2a_gib": a2a / GiB, "expert_all_gather_gib": fsdp.expert_all_gather_bytes / GiB})
    header = ["ep", "experts/rank/layer", "largest unit", "transient", "total/GPU", "a2a per micro-batch",
              "expert all-gather GiB", "other all-gather GiB"]
    return table(header, rows), records


def seq_rows(s: Setting, precision: Precision) -> str:
    rows = []
    for name, make in MODELS.items():
        cfg = make()
        for seq in (4096, 16384, 32768):
            rows.append([name, f"{seq}"] + [gib(activation_bytes(cfg, tokens=s.batch * seq, compute=precision.compute,
                                                                 checkpointing=ck)) for ck in (False, True)])
    return table(["model", "tokens per GPU", "activations, no ckpt", "activations, ckpt per block"], rows)


def with_experts(cfg: ModelConfig, n: int) -> ModelConfig:
    return cfg.replace(moe=cfg.moe.replace(n_routed_experts=n))


def peak(cfg: ModelConfig, s: Setting, precision: Precision) -> float:
    return estimate_memory(cfg, mesh_for(cfg, s), precision, batch=s.batch, seq_len=s.seq_len,
                           checkpointing=True).total_bytes


def largest_fitting(family: Callable[[int], ModelConfig], values: list[int], s: Setting,
                    precision: Precision) -> int | None:
    """The largest of ``values`` (ascending; memory grows along them) whose model fits the budget: bisection."""
    if peak(family(values[0]), s, precision) > s.budget:
        return None
    lo, hi = 0, len(values)  # values[lo] fits; values[hi:] are not known to
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(family(values[mid]), s, precision) <= s.budget else (lo, mid)
    return values[lo]


def families(s: Setting) -> list[tuple[str, Callable[[int], ModelConfig], list[int]]]:
    """Each published shape grown along one axis: routed experts in multiples of the rank count (every rank
    then holds whole experts: no FSDP padding), or depth at the published expert count."""
    v2, v3 = deepseek_v2(), deepseek_v3()
    experts = list(range(s.world, 4097, s.world))
    return [("V2 widths, E routed experts", lambda n: with_experts(v2, n), experts),
            ("V3 widths, E routed experts", lambda n: with_experts(v3, n), experts),
            ("V2 (160 experts), L layers", lambda n: v2.replace(n_layers=n), list(range(2, 257))),
            ("V3 (256 experts), L layers", lambda n: v3.replace(n_layers=n), list(range(4, 257)))]


def fit_rows(s: Setting) -> tuple[str, list[dict]]:
    rows, records = [], []
    for name, family, values in families(s):
        axis = name.split(", ")[1].split()[0]  # E or L
        for precision in (BF16_MIXED, V3_RECIPE):
            best = largest_fitting(family, values, s, precision)
            if best is None:
                rows.append([name, precision.name, "none", "", "", ""])
                continue
            cfg = family(best)
            total, activated = count_parameters(cfg)
            following = values[values.index(best) + 1] if best != values[-1] else None
            over = "" if following is None else f"{axis} = {following}: {gib(peak(family(following), s, precision))}"
            rows.append([name, precision.name, f"{axis} = {best}",
                         f"**{total / 1e9:.0f}B** ({activated / 1e9:.1f}B act.)", gib(peak(cfg, s, precision)), over])
            records.append({"family": name, "precision": precision.name, axis: best, "total": total,
                            "activated": activated, "total_gib": peak(cfg, s, precision) / GiB})
    header = ["family", "precision", "largest that fits", "parameters", "GiB/GPU", "one step further"]
    return table(header, rows), records


def total_on(cfg: ModelConfig, s: Setting, precision: Precision, nodes: int, expert_fsdp_dim: int) -> float:
    mesh = replace(mesh_for(cfg, replace(s, world=nodes * GPUS_PER_NODE)), expert_fsdp_dim=expert_fsdp_dim)
    return estimate_memory(cfg, mesh, precision, batch=s.batch, seq_len=s.seq_len, checkpointing=True).total_bytes


def nodes_rows(s: Setting) -> tuple[str, list[dict]]:
    """The fewest 8-GPU nodes on which each model fits, activation checkpointing on: the sharded state shrinks
    as 1/N (in whole experts when FSDP shards them on dim 0), the largest unit and the activations do not."""
    rows, records = [], []
    for name, make in MODELS.items():
        cfg = make()
        for precision in PRECISIONS.values():
            cells = []
            for dim in (0, 1):
                nodes = next((n for n in range(1, 257) if total_on(cfg, s, precision, n, dim) <= s.budget), None)
                cells.append("none up to 256" if nodes is None else
                             f"{nodes} ({nodes * GPUS_PER_NODE} GPUs): {gib(total_on(cfg, s, precision, nodes, dim))} GiB")
                records.append({"model": name, "precision": precision.name, "expert_fsdp_dim": dim, "nodes": nodes})
            rows.append([name, precision.name, *cells])
    return table(["model", "precision", "fewest nodes that fit (experts FSDP on dim 0, as built)",
                  "experts FSDP on dim 1"], rows), records


def build(s: Setting) -> tuple[dict[str, str], dict]:
    memory, mem_records = memory_rows(s)
    traffic, traffic_records = traffic_rows(s, BF16_MIXED)
    eps, ep_records = ep_rows(s, BF16_MIXED)
    fits, fit_records = fit_rows(s)
    nodes, node_records = nodes_rows(s)
    tables = {"assumptions": assumptions(s), "memory": memory, "traffic": traffic, "ep": eps,
              "seq_len": seq_rows(s, BF16_MIXED), "largest": fits, "nodes": nodes}
    record = {"benchmark": "scaling_table", "world": s.world, "batch": s.batch, "seq_len": s.seq_len,
              "budget_gib": s.budget / GiB, "memory": mem_records, "traffic": traffic_records, "ep": ep_records,
              "largest": fit_records, "nodes": node_records}
    return tables, record


MARKER = re.compile(r"(<!-- table: (\w+) -->\n)(.*?)(<!-- /table -->)", re.DOTALL)


def fill(doc: str, tables: dict[str, str]) -> str:
    """``doc`` with every marked table replaced by the current one; an unknown table name is an error."""
    def replace(m: re.Match[str]) -> str:
        if m.group(2) not in tables:
            raise SystemExit(f"unknown table {m.group(2)!r}; known: {', '.join(tables)}")
        return f"{m.group(1)}{tables[m.group(2)]}\n{m.group(4)}"
    return MARKER.sub(replace, doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="DOC", help="refresh the tables in DOC")
    group.add_argument("--check", type=Path, metavar="DOC", help="exit 1 if DOC's tables differ from the code's")
    args = parser.parse_args(argv)
    tables, record = build(Setting())
    if args.write or args.check:
        path = args.write or args.check
        doc = path.read_text()
        new = fill(doc, tables)
        if args.check:
            if new != doc:
                print(f"{path} is stale: run python benchmarks/scaling_table.py --write {path}", file=sys.stderr)
                return 1
            return 0
        path.write_text(new)
        return 0
    for name, text in tables.items():
        print(f"## {name}\n\n{text}\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
