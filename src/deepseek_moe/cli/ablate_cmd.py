"""``deepseek-moe ablate``: the DeepSeekMoE ablation (``deepseek_moe.ablate.run_ablation``) from the command line."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deepseek_moe.ablate.config import AblationConfig

DESCRIPTION = ("Train dense, GShard, shared, fine-grained and DeepSeekMoE models that differ only in the FFN of "
               "their MoE layers (same data, tokens, seeds and optimiser; equal activated and total expert "
               "parameters), then write results.json, results.md and plots to --out. Rerun the same command to "
               "continue a partly finished ablation.")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="reproduce the DeepSeekMoE ablation (about an hour on 2 CPU cores; "
                       "--quick: 10 minutes)", description=DESCRIPTION)
    p.add_argument("--out", default="runs/ablation", metavar="DIR", help="output directory (default runs/ablation)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="seed 0 only, 100 steps (about 10 minutes on 2 CPU cores)")
    size.add_argument("--balance", action="store_true",
                      help="deepseekmoe against token dropping at a fixed and an adaptive capacity factor and the "
                           "routing-entropy regulariser: 3 seeds, 100 steps (about 15 minutes on 2 CPU cores)")
    p.add_argument("--data", action="extend", nargs="+", metavar="PATH",
                   help="training text, as `deepseek-moe train --data` (default: the embedded stdlib corpus)")
    p.add_argument("--val-data", action="extend", nargs="+", metavar="PATH",
                   help="validation text, as `deepseek-moe train --val-data` (default: a held-out split of --data)")
    p.add_argument("--variants", metavar="A,B,...", help="a subset of the variants (default: all)")
    p.add_argument("--seeds", metavar="S,T,...", help="seeds (default 0,1,2; --quick: 0)")
    p.add_argument("--steps", type=int, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, help="sequences per step")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--lr", type=float, help="peak learning rate (the same for every variant)")
    p.add_argument("--eval-every", type=int, help="steps between validation passes")
    p.add_argument("--dim", type=int, help="model width")
    p.add_argument("--n-layers", type=int, help="layers (the first dense)")
    p.add_argument("--n-experts", type=int, help="N: experts of the conventional (GShard) model")
    p.add_argument("--expert-dim", type=int, help="W: their hidden width")
    p.add_argument("--segmentation", type=int, help="m of deepseekmoe and fine_grained_only (default 4)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"),
                   help="as `deepseek-moe train` (default auto: bf16 autocast where the CPU/GPU has native bf16)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run_command)


def build_config(args: argparse.Namespace) -> AblationConfig:
    from deepseek_moe.ablate.config import balance, full, quick
    from deepseek_moe.train.errors import TrainError

    cfg = quick() if args.quick else balance() if args.balance else full()
    shape_changes = {k: getattr(args, k) for k in ("dim", "n_layers", "n_experts", "expert_dim", "segmentation")
                     if getattr(args, k) is not None}
    changes = {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "lr", "eval_every", "device",
                                              "dtype", "threads") if getattr(args, k) is not None}
    if args.variants:
        changes["variants"] = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if args.data:
        changes["data_paths"] = tuple(args.data)
    if args.val_data:
        changes["val_paths"] = tuple(args.val_data)
    try:
        if args.seeds:
            changes["seeds"] = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        if shape_changes:
            changes["shape"] = dataclasses.replace(cfg.shape, **shape_changes)
        return cfg.replace(**changes)
    except ValueError as e:
        raise TrainError(f"ablate: {e}") from e


def run_command(args: argparse.Namespace) -> int:
    from deepseek_moe.ablate.run import run_ablation

    run_ablation(build_config(args), args.out, progress=not args.quiet)
    return 0
