"""What a fine-tune gains on its new text and loses on the old (issue 21, Quality).

For a train run (BASE, e.g. the default run on the stdlib sources) and fine-tunes of it (``deepseek-moe finetune``
run directories, LoRA or full), the mean next-token loss of BASE and of each fine-tuned model on

- the fine-tune's validation rows (``RUN/data/val.npy``: its ``--val-data`` or held-out records, packed as it
  trained; the loss it reports), and
- BASE's own validation split (the stdlib text held out of the train run, cut as the train run cut it).

A LoRA run is scored as ``from_pretrained(BASE, adapters=[RUN/adapter])``, a full one from ``RUN/model``.

    python benchmarks/finetune_quality.py runs/default runs/licenses-lora runs/licenses-full
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import uptime, validation_batches  # noqa: E402

import deepseek_moe as dm  # noqa: E402
from deepseek_moe.finetune.packing import n_predictions, packed_forward  # noqa: E402
from deepseek_moe.io.locate import checkpoint_dir  # noqa: E402
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM  # noqa: E402


@torch.inference_mode()
def plain_loss(model: DeepSeekMoEForCausalLM, batches: list[torch.Tensor]) -> float:
    """Mean loss over every predicted token of plain (B, T) batches, as the train run validates."""
    nll, n = 0.0, 0
    for batch in batches:
        out = model(batch, labels=batch)
        k = batch[:, 1:].numel()
        nll, n = nll + float(out.ce_loss) * k, n + k
    return nll / n


@torch.inference_mode()
def packed_loss(model: DeepSeekMoEForCausalLM, rows: np.ndarray, batch_size: int = 8) -> float:
    """Mean loss over the labelled tokens of packed (N, 3, T) rows, as the fine-tune validates."""
    nll, n = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = torch.from_numpy(np.asarray(rows[i:i + batch_size], dtype=np.int64))
        k = n_predictions(batch)
        nll, n = nll + float(packed_forward(model, batch).ce_loss) * k, n + k
    return nll / n


def load_finetuned(run: Path, base: Path) -> tuple[str, DeepSeekMoEForCausalLM]:
    cfg = json.loads((run / "finetune.json").read_text())
    if checkpoint_dir(cfg["base"]).resolve() != base.resolve():
        raise SystemExit(f"{run} fine-tuned {cfg['base']}, not {base}")
    if cfg["method"] == "lora":
        return "lora", dm.from_pretrained(base, adapters=[run / "adapter"])
    return cfg["method"], dm.from_pretrained(run / "model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="the train run the fine-tunes started from")
    ap.add_argument("runs", nargs="+", help="fine-tune run directories")
    args = ap.parse_args()
    print(uptime())
    torch.manual_seed(0)
    base_dir = checkpoint_dir(args.base)
    base = dm.from_pretrained(base_dir).eval()
    old = validation_batches(Path(args.base), base.tokenizer)
    base_old = plain_loss(base, old)
    base_new: dict[bytes, float] = {}  # the runs usually share one validation text: score BASE on it once
    results = []
    print(f"BASE {args.base}: {sum(b[:, 1:].numel() for b in old)} predicted tokens of its own validation text")
    print(f"{'run':28s} {'method':6s} {'new text: before':>16s} {'after':>7s} {'change':>7s} "
          f"{'old text: before':>16s} {'after':>7s} {'change':>7s}")
    for run in map(Path, args.runs):
        rows = np.load(run / "data" / "val.npy", mmap_mode="r")
        key = np.asarray(rows).tobytes()
        if key not in base_new:
            base_new[key] = packed_loss(base, rows)
        method, model = load_finetuned(run, base_dir)
        model.eval()
        r = {"run": str(run), "method": method, "new_tokens": int(sum(n_predictions(torch.from_numpy(
             np.asarray(rows[i:i + 1], dtype=np.int64))) for i in range(len(rows)))),
             "new_before": base_new[key], "new_after": packed_loss(model, rows),
             "old_before": base_old, "old_after": plain_loss(model, old)}
        results.append(r)
        print(f"{str(run):28s} {method:6s} {r['new_before']:16.3f} {r['new_after']:7.3f} "
              f"{r['new_after'] - r['new_before']:+7.3f} {r['old_before']:16.3f} {r['old_after']:7.3f} "
              f"{r['old_after'] - r['old_before']:+7.3f}")
    print(uptime())
    print(json.dumps({"benchmark": "finetune_quality", "base": args.base, "results": results}))


if __name__ == "__main__":
    main()
