"""``deepseek-moe quantize MODEL OUT --bits 8|4``: write a weight-only int8 / int4 copy of a checkpoint.

MODEL is a Hugging Face checkpoint directory or a train run directory (its model/ is used). It is read tensor by
tensor and quantised while streaming (in row chunks), so memory peaks near the quantised model, never the
full-precision one. The result loads with ``deepseek_moe.from_pretrained(OUT)`` and runs with
``deepseek-moe generate OUT`` (and ``serve``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from deepseek_moe.cli.main import UsageError
from deepseek_moe.io.locate import checkpoint_dir


def register(sub: argparse._SubParsersAction) -> None:
    from deepseek_moe.quant.config import GROUP_SIZES, PARTS

    p = sub.add_parser("quantize", help="write an int8 / int4 weight-only copy of a checkpoint", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="Hugging Face checkpoint directory or train run directory")
    p.add_argument("out", metavar="OUT", help="directory to write (created)")
    p.add_argument("--bits", type=int, choices=(8, 4), required=True,
                   help="8: int8 per output channel; 4: int4 in groups along the input")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=32,
                   help="int4 group width (default 32); a layer whose input width is not a multiple of it is "
                   "stored int8 per channel instead")
    p.add_argument("--keep", default="wkv_b", metavar="PARTS",
                   help=f"comma-separated parts left unquantised, from: {', '.join(PARTS)} (default: wkv_b; "
                   "'' quantises everything but the embedding and the router)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deepseek_moe.quant import QuantConfig, quantize_checkpoint

    src = checkpoint_dir(args.model)
    out = Path(args.out)
    if out.resolve() == src.resolve():
        raise UsageError(f"OUT ({out}) is the checkpoint itself; choose another directory")
    try:
        qcfg = QuantConfig(bits=args.bits, group_size=args.group_size,
                           keep=frozenset(p.strip() for p in args.keep.split(",") if p.strip()))
        t0 = time.perf_counter()
        quantize_checkpoint(src, out, qcfg)
    except ValueError as e:
        raise UsageError(str(e)) from e
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    before = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(f"wrote {out} (int{args.bits}: {size / 1e6:.1f} MB from {before / 1e6:.1f} MB) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
