"""``deepseek-moe merge BASE ADAPTER OUT``: fold a LoRA adapter into its base and write a checkpoint.

BASE is a checkpoint directory or a train run directory (its model/ is used); ADAPTER a directory in PEFT's format
(``adapter_config.json`` + ``adapter_model.safetensors``: a fine-tune's RUN/adapter, or one PEFT wrote for
transformers' DeepseekV2/V3). OUT gets BASE's layout and dtype, and BASE's tokenizer files.
"""

from __future__ import annotations

import argparse
import time

from deepseek_moe.cli.main import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base checkpoint", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", metavar="BASE", help="checkpoint directory or train run directory")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory (PEFT format)")
    p.add_argument("out", metavar="OUT", help="directory to write (created)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deepseek_moe.adapters.pretrained import merge_checkpoint

    t0 = time.perf_counter()
    try:
        written = merge_checkpoint(args.base, args.adapter, args.out)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    print(f"wrote {args.out} ({written}) in {time.perf_counter() - t0:.1f} s")
    return 0
