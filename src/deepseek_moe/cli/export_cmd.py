"""``deepseek-moe export onnx CKPT|RUN_DIR OUT_DIR [--int8]``: the language model as ONNX prefill/decode graphs
(with the tokenizer beside them) that ONNX Runtime alone can generate with.

``deepseek-moe export hf RUN_DIR OUT [--step N]``: the Hugging Face checkpoint of any checkpoint step of a
training run (default: the latest), as ``train`` writes ``RUN_DIR/model/`` at its end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deepseek_moe.cli.main import UsageError
from deepseek_moe.io.locate import checkpoint_dir

TOKENIZER_FILE = "tokenizer.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to another format (onnx, hf)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    onnx = formats.add_parser("onnx", help="ONNX prefill + decode graphs for ONNX Runtime",
                              description="Write OUT_DIR/prefill.onnx and OUT_DIR/decode.onnx (the latent cache as "
                              "explicit tensors: past.{i}.c_kv / past.{i}.k_pe in, present.{i}.* out), "
                              "export.json describing them, and the checkpoint's tokenizer.json.")
    onnx.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (config.json + safetensors) or a "
                      "train run directory (its model/ is used)")
    onnx.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="directory to write (created; must not "
                      "already hold prefill.onnx/decode.onnx)")
    onnx.add_argument("--int8", action="store_true", help="also write prefill.int8.onnx and decode.int8.onnx "
                      "(ONNX Runtime dynamic quantisation, int8 weights)")
    onnx.add_argument("--check", action="store_true", help="after exporting, generate a few tokens with ONNX "
                      "Runtime and with PyTorch and report whether they agree")
    onnx.set_defaults(func=run_onnx)

    hf = formats.add_parser("hf", help="the Hugging Face checkpoint of a training run's step",
                            description="Write OUT (config.json, safetensors, tokenizer.json) from RUN_DIR/state/"
                            "step-N/, on one process: the files train writes to RUN_DIR/model/ at its end, for any "
                            "step that has a checkpoint. generate, serve, info and export onnx read OUT.")
    hf.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a train run directory")
    hf.add_argument("out", metavar="OUT", type=Path, help="directory to write (created; must be new or empty "
                    "unless --force)")
    hf.add_argument("--step", type=int, default=None, metavar="N", help="the checkpoint step to export "
                    "(default: the latest)")
    hf.add_argument("--force", action="store_true", help="write into OUT even if it holds files")
    hf.set_defaults(func=run_hf)


def run_hf(args: argparse.Namespace) -> int:
    from deepseek_moe.train.export_hf import export_step

    out: Path = args.out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        raise UsageError(f"{out} already exists{'' if out.is_dir() else ' and is not a directory'}; choose a new "
                         "directory" + (" or pass --force" if out.is_dir() else ""))
    fmt, step = export_step(args.run_dir, out, step=args.step)
    print(f"wrote {out} (step {step}, format {fmt})")
    return 0


def run_onnx(args: argparse.Namespace) -> int:
    import deepseek_moe
    from deepseek_moe.export import ExportError
    from deepseek_moe.export.lm import export_language_model

    source = checkpoint_dir(args.checkpoint)  # CheckpointError (exit 2) for a path that isn't a checkpoint
    model = deepseek_moe.from_pretrained(source, dtype="float32")
    tokenizer = source / TOKENIZER_FILE
    try:
        out = export_language_model(model, args.out_dir, int8=args.int8,
                                    tokenizer_file=tokenizer if tokenizer.is_file() else None)
    except ExportError as e:
        raise UsageError(str(e)) from e
    for name in sorted(p.name for p in out.iterdir() if not p.name.startswith(".")):
        print(f"{out / name}")
    if args.check:
        from deepseek_moe.export.runtime import OnnxLM

        prompt = [[1, 2, 3, 4]]
        ours = deepseek_moe.generate(model, prompt, max_new_tokens=8).new_tokens[0]
        theirs = OnnxLM(out).generate(prompt, max_new_tokens=8)[0]
        print(f"check: PyTorch {ours}\n       ORT     {theirs}\n       {'agree' if ours == theirs else 'DIFFER'}")
        return 0 if ours == theirs else 1
    return 0
