"""The ``train`` command: its flags, the TrainConfig they build, and ``main`` for ``python -m deepseek_moe.train``.

``deepseek-moe train`` registers the same flags (``cli/train_cmd.py``), so both read the same arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deepseek_moe.train.config import TrainConfig
from deepseek_moe.train.errors import TrainError

DESCRIPTION = ("Train a DeepSeekMoE language model and write a run directory. With no arguments: the tiny preset "
               "on the embedded corpus of CPython standard-library sources.")

# Shortcut flag → config field.
SHORTCUTS = {
    "preset": "model.preset", "steps": "schedule.steps", "batch_size": "schedule.batch_size",
    "seq_len": "data.seq_len", "lr": "optim.lr", "device": "device", "dtype": "dtype", "seed": "seed",
    "out": "out", "ep": "ep", "activation_checkpointing": "activation_checkpointing", "mtp_depth": "model.mtp_depth",
    "optimizer_moments": "optim.moments",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="model preset (default tiny)")
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file, nested like the config")
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="a.b.c=VALUE",
                   help="set any config field (repeatable); VALUE is a JSON/TOML literal or a string")
    p.add_argument("--data", action="extend", nargs="+", metavar="PATH",
                   help="text file, folder or .jsonl (one or more; repeatable; default: the embedded stdlib corpus)")
    p.add_argument("--val-data", action="extend", nargs="+", metavar="PATH",
                   help="validation text apart from the training text, read like --data (one or more; repeatable; default: "
                   "data.val_fraction of the documents, chosen by name)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--optimizer-moments", choices=("float32", "bfloat16"),
                   help="dtype of AdamW's two moments between steps (default float32): bfloat16 halves their "
                   "memory, as DeepSeek-V3 trains (needs beta2 <= 0.992; the default 0.95 is)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/<YYYYmmdd-HHMMSS>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--extend-steps", type=int, metavar="N",
                   help="with --resume: train N steps past the run's planned end, at its final learning rate and in "
                   "its last routing stage (the run's schedule is otherwise fixed)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), help="default auto: bf16 autocast (fp32 master weights) where the device has native bf16 "
                   "(CUDA; CPUs with AVX512-BF16 or AMX), else fp32")
    p.add_argument("--seed", type=int)
    p.add_argument("--mtp-depth", type=int, metavar="D",
                   help="train D multi-token-prediction modules beside the model (DeepSeek-V3; default the preset's, "
                   "0), their loss weighted by schedule.mtp_lambda (V3's 0.3, then 0.1); they can draft for "
                   "speculative decoding")
    p.add_argument("--activation-checkpointing", nargs="?", const="full", default=None,
                   choices=("none", "full", "attention"), metavar="MODE",
                   help="recompute activations in the backward instead of keeping them: full (the flag alone) each "
                   "whole block (about one more forward per step, for the memory of long sequences), attention only "
                   "each block's attention half (LoRA on a quantised MoE: the expert products run once), none")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train on N processes (re-launches through torch.distributed.run): FSDP2 over all of them, "
                   "routed experts split over --ep of them; gloo on CPU, NCCL on GPU (one per process)")
    p.add_argument("--ep", type=int, metavar="EP",
                   help="expert-parallel size under --nproc/torchrun: a divisor of N and of n_expert_groups (default "
                   "0: automatic, the largest that fits); each expert slice is sharded over the other N/EP ranks")


def build_config(args: argparse.Namespace) -> TrainConfig:
    from deepseek_moe.train.config import resolve_config
    from deepseek_moe.train.rundir import read_run_config

    assignments = list(args.assignments)
    base = None
    if args.resume:
        if args.out and Path(args.out) != Path(args.resume):
            raise TrainError(f"--resume {args.resume} continues in place; drop --out {args.out}")
        base = read_run_config(args.resume)
        assignments.append(f"out={json.dumps(args.resume)}")
    if args.extend_steps is not None:
        if base is None:
            raise TrainError("--extend-steps N continues a run: use it with --resume RUN_DIR (a new run: --steps)")
        if args.extend_steps < 1:
            raise TrainError(f"--extend-steps ({args.extend_steps}) must be a positive number of steps")
        planned = base.get("schedule", {}).get("extra_steps", 0)
        assignments.append(f"schedule.extra_steps={planned + args.extend_steps}")
    for flag, field in SHORTCUTS.items():
        value = getattr(args, flag)
        if value is not None:
            assignments.append(f"{field}={json.dumps(value)}")
    if args.data:
        assignments.append(f"data.paths={json.dumps(args.data)}")
    if args.val_data:
        assignments.append(f"data.val_paths={json.dumps(args.val_data)}")
    try:
        return resolve_config(config_file=args.config, assignments=assignments, base=base)
    except TrainError:
        raise
    except ValueError as e:  # config validation: a person's mistake, not a bug
        raise TrainError(str(e)) from e


def run_command(args: argparse.Namespace) -> int:
    from deepseek_moe.train.loop import run

    cfg = build_config(args)
    if args.nproc is not None and args.nproc != 1:
        return launch(args, cfg)
    run(cfg, resume=bool(args.resume), force=args.force, progress=not args.quiet)
    return 0


def launch(args: argparse.Namespace, cfg: TrainConfig) -> int:
    """Re-run this command on ``args.nproc`` processes, after checking that the model's expert groups and the
    batch fit that many processes."""
    from deepseek_moe.parallel import LaunchFailed, check_training_layout, env_world_size
    from deepseek_moe.parallel import launch as launch_processes
    from deepseek_moe.train.build import build_model_config
    from deepseek_moe.train.rundir import check_same_plan

    if args.nproc < 1:
        raise TrainError(f"--nproc ({args.nproc}) must be a positive number of processes")
    if env_world_size() > 1:
        raise TrainError("--nproc inside torchrun: drop --nproc (torchrun already started the processes)")
    if args.resume:
        check_same_plan(args.resume, cfg)  # here, rather than in rank 0 of N
    try:
        moe = build_model_config(cfg, cfg.data.vocab_size, 0).moe
        check_training_layout(moe, cfg.schedule.batch_size, args.nproc, cfg.ep)
    except ValueError as e:
        raise TrainError(f"cannot train on {args.nproc} processes: {e}") from e

    argv = []
    for flag in (*SHORTCUTS, "config", "resume"):
        value = getattr(args, flag)
        if value is True:  # a switch
            argv.append(f"--{flag.replace('_', '-')}")
        elif value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    for item in args.assignments:
        argv += ["--set", item]
    if args.extend_steps is not None:  # the total: the ranks read config.json while rank 0 rewrites it
        argv += ["--set", f"schedule.extra_steps={cfg.schedule.extra_steps}"]
    for path in args.data or []:
        argv += ["--data", path]
    for path in args.val_data or []:
        argv += ["--val-data", path]
    argv += [f"--{flag}" for flag in ("force", "quiet") if getattr(args, flag)]
    try:
        launch_processes("deepseek_moe.train", argv, args.nproc)
    except LaunchFailed as e:
        raise TrainError(f"training on {args.nproc} processes failed ({e}); when one rank fails torchrun stops "
                         "the others: the first traceback above is the cause") from e
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m deepseek_moe.train``: the same as ``deepseek-moe train``."""
    parser = argparse.ArgumentParser(prog="deepseek-moe train", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


__all__ = ["DESCRIPTION", "SHORTCUTS", "add_arguments", "build_config", "main", "run_command"]
