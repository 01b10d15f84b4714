"""``deepseek-moe finetune BASE --data PATH --out RUN``: fine-tune a checkpoint (LoRA by default, or full).

BASE is a checkpoint or train run directory; the run keeps BASE's tokenizer (tokenizer.json) and chat template
(tokenizer_config.json), or --tokenizer PATH where BASE has none. --data: .jsonl of {"messages": [...]} (chat),
{"prompt", "completion"} or {"text"}, or text files / folders. The loss counts the assistant / completion tokens
(--loss-on all: every token; with --method full on text, that is continued pretraining). Routers and their bias
stay BASE's unless --train-router. RUN gets the Trainer's run directory (metrics, plots, state/ for --resume) and
RUN/adapter (PEFT's format: deepseek-moe merge, from_pretrained(BASE, adapters=[...]), PEFT) or, with --method
full, RUN/model. --quantize int8|int4 trains LoRA on BASE held in our quantised format (the memory of V2-Lite on
a 24 GB machine); its adapter merges into the unquantised BASE. --quantize bf16 holds BASE's matrices in bf16
under fp32 activations (products widen each weight: fast where the CPU has no native bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Literal

from deepseek_moe.train.errors import TrainError

if TYPE_CHECKING:
    from deepseek_moe.finetune.config import FinetuneConfig


# --malloc's choices as TrainConfig.keep_freed_memory values
MALLOC_POLICIES: dict[str, bool | Literal["release"]] = {"keep": True, "release": "release", "default": False}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a checkpoint (LoRA or full) on chat, prompt/completion or text",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", metavar="BASE", nargs="?", help="checkpoint or train run directory")
    p.add_argument("--data", action="extend", nargs="+", metavar="PATH",
                   help="training data (one or more paths, e.g. a shell glob; repeatable)")
    p.add_argument("--val-data", action="extend", nargs="+", metavar="PATH",
                   help="validation data (one or more; repeatable; default: every 1/--val-fraction-th record of "
                   "--data)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--out", metavar="RUN", help="run directory (default runs/<YYYYmmdd-HHMMSS>)")
    p.add_argument("--resume", metavar="RUN", help="continue the fine-tune in RUN from its latest checkpoint")
    p.add_argument("--method", choices=("lora", "full"), default="lora")
    p.add_argument("--targets", default=None, metavar="LIST",
                   help="LoRA targets, comma-separated groups (attention, shared_experts, routed_experts, dense_ffn, "
                   "head) or module names (default: attention, shared and routed experts, dense FFNs)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--rslora", action="store_true", help="scale alpha / sqrt(r)")
    p.add_argument("--loss-on", choices=("completion", "all"), default="completion")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed row")
    p.add_argument("--strict", action="store_true", help="refuse a bad line instead of reporting and skipping it")
    p.add_argument("--train-router", action="store_true", help="train the routers' weights and routing bias too")
    p.add_argument("--no-mtp", dest="mtp", action="store_false",
                   help="load BASE without its multi-token-prediction modules (by default they are loaded and "
                   "their loss trains along, so they still draft for the fine-tuned model)")
    p.add_argument("--quantize", choices=("int8", "int4", "bf16"), default=None,
                   help="LoRA on BASE frozen in our int8 / int4 format (adapters in float; merge them into the "
                   "unquantised BASE), or with its matrices in bf16 under fp32 activations")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json to use where BASE has none")
    p.add_argument("--activation-checkpointing", nargs="?", const="full", default="none",
                   choices=("none", "full", "attention"), metavar="MODE",
                   help="recompute activations in the backward: full (the flag alone) each whole block, attention "
                   "only each block's attention half (on a quantised MoE base the expert products then run once: "
                   "V2-Lite's int8 LoRA in 22 GB, docs/finetuning.md), none")
    p.add_argument("--expert-activations", choices=("float32", "bfloat16"), default="float32",
                   help="what LoRA on quantised routed experts keeps its gate/up pre-activations in for the "
                   "backward: bfloat16 halves that memory, gradients at bf16 rounding")
    p.add_argument("--malloc", choices=("keep", "release", "default"), default="keep",
                   help="glibc malloc and freed memory: keep it for the next step (fastest), release blocks of 1 MB "
                   "and more at once (lowest peak memory: V2-Lite's int8 LoRA; with THP_MEM_ALLOC_ENABLE=1 in the "
                   "environment, fewer page faults), or malloc's defaults")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 LoRA, 2e-5 full)")
    p.add_argument("--optimizer-moments", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of AdamW's two moments between steps: bfloat16 halves their memory (0.94 GB for "
                   "V2-Lite's LoRA r=16), as DeepSeek-V3 trains; needs beta2 <= 0.992 (ours is 0.95)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    p.set_defaults(func=run_command)


def build_config(args: argparse.Namespace) -> FinetuneConfig:
    from deepseek_moe.adapters.config import DEFAULT_TARGETS, LoRAConfig
    from deepseek_moe.finetune.config import FinetuneConfig
    from deepseek_moe.finetune.run import read_run
    from deepseek_moe.train.config import (
        CheckpointConfig,
        EvalConfig,
        OptimConfig,
        ScheduleConfig,
        TrainConfig,
    )

    if args.resume:
        if args.base or args.data:
            raise TrainError(f"--resume {args.resume} continues the run as it was started: drop BASE and --data")
        return read_run(args.resume)
    if not args.base or not args.data:
        raise TrainError("give BASE and --data PATH (or --resume RUN)")
    lr = args.lr if args.lr is not None else (2e-4 if args.method == "lora" else 2e-5)
    targets = (tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets is not None
               else DEFAULT_TARGETS)
    try:
        train = TrainConfig(optim=OptimConfig(lr=lr, weight_decay=0.0, moments=args.optimizer_moments),
                            seed=args.seed, device=args.device, dtype=args.dtype, activation_checkpointing=args.activation_checkpointing,
                            keep_freed_memory=MALLOC_POLICIES[args.malloc],
                            schedule=ScheduleConfig(steps=args.steps, batch_size=args.batch_size,
                                                    grad_accum_steps=args.grad_accum),
                            eval=EvalConfig(every=args.eval_every, sample_tokens=0),
                            checkpoint=CheckpointConfig(every=args.checkpoint_every))
        lora = LoRAConfig(r=args.rank, alpha=args.alpha, dropout=args.lora_dropout, use_rslora=args.rslora,
                          targets=targets)
        return FinetuneConfig(base=args.base, data=tuple(args.data), val_data=tuple(args.val_data or ()),
                              val_fraction=args.val_fraction, out=args.out, tokenizer=args.tokenizer,
                              method=args.method, lora=lora, loss_on=args.loss_on, seq_len=args.seq_len,
                              strict=args.strict, train_router=args.train_router, quantize=args.quantize, mtp=args.mtp,
                              expert_activations=args.expert_activations, train=train)
    except ValueError as e:
        raise TrainError(str(e)) from e


def run_command(args: argparse.Namespace) -> int:
    from deepseek_moe.finetune.run import run

    cfg = build_config(args)
    if args.resume:
        cfg = dataclasses.replace(cfg, out=args.resume)
    result = run(cfg, resume=bool(args.resume), force=args.force, progress=not args.quiet)
    written = "adapter" if cfg.method == "lora" else "model"
    if not args.quiet:
        print(f"validation loss {result.val_loss:.3f}; wrote {result.run_dir / written}")
    return 0
