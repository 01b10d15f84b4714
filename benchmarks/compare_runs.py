"""Do two (or more) training runs learn the same? Their loss curves side by side: a table of train and
validation loss at every logged step, the final whole-split validation loss and tokens/s, and one plot.

Made for issue 14's question, the default run in fp32 against bf16 autocast (run both, then compare):

    deepseek-moe train --out runs/bf16            # the default: bf16 autocast on native-bf16 CPUs
    deepseek-moe train --out runs/fp32 --dtype fp32
    python benchmarks/compare_runs.py runs/fp32 runs/bf16 --plot runs/fp32_vs_bf16.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def read_run(path: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((path / "config.json").read_text())
    summary = next((r for r in records if r.get("kind") == "summary"), None)
    return {
        "name": path.name,
        "precision": config.get("precision", {}).get("dtype", config.get("dtype", "?")),
        "train": {r["step"]: r["ce_loss"] for r in records if r.get("kind") == "train"},
        "val": {r["step"]: r["val_loss"] for r in records if r.get("kind") == "val"},
        "final_val": summary["val_loss"] if summary else None,
        "tokens_per_s": summary["tokens_per_s"] if summary else None,
    }


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    from deepseek_moe.figure import figure

    with figure(path, figsize=(7, 4), dpi=110, xlabel="step", ylabel="cross-entropy, nats / token",
                legend=True) as ax:
        for run in runs:
            label = f"{run['name']} ({run['precision']})"
            line, = ax.plot(list(run["train"]), list(run["train"].values()), lw=1, label=f"{label} train")
            ax.plot(list(run["val"]), list(run["val"].values()), "o--", color=line.get_color(), lw=1,
                    label=f"{label} validation")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (metrics.jsonl, config.json)")
    ap.add_argument("--plot", type=Path, help="write the curves here (PNG)")
    args = ap.parse_args()
    runs = [read_run(p) for p in args.runs]
    names = [f"{r['name']} ({r['precision']})" for r in runs]
    steps = sorted(set().union(*(r["train"] for r in runs)) | set().union(*(r["val"] for r in runs)))
    print("| step | " + " | ".join(f"{n} train | {n} val" for n in names) + " |")
    print("|---" * (1 + 2 * len(runs)) + "|")
    for step in steps:
        cells = []
        for r in runs:
            cells += [f"{r['train'][step]:.3f}" if step in r["train"] else "",
                      f"{r['val'][step]:.3f}" if step in r["val"] else ""]
        print(f"| {step} | " + " | ".join(cells) + " |")
    print()
    for name, r in zip(names, runs, strict=True):
        final = f"{r['final_val']:.4f}" if r["final_val"] is not None else "(unfinished)"
        speed = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] is not None else "?"
        print(f"{name}: final validation loss (whole split) {final}, {speed} tokens/s")
    if args.plot:
        plot(runs, args.plot)
        print(f"wrote {args.plot}")
    print(json.dumps({"benchmark": "compare_runs", "runs": runs}))


if __name__ == "__main__":
    main()
