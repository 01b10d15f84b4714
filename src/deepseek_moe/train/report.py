"""What a run leaves for people to look at: loss.png, routing_heatmap.png and per-layer load tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deepseek_moe.figure import figure
from deepseek_moe.viz import plot_routing_heatmap


def plot_loss(records: list[dict[str, Any]], path: Path, *, unigram_entropy: float | None = None) -> Path:
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    with figure(path, figsize=(7, 4), dpi=110, title="Training loss", xlabel="step", ylabel="nats / token",
                legend=True) as ax:
        if train:
            ax.plot([r["step"] for r in train], [r["ce_loss"] for r in train], label="train cross-entropy", lw=1)
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", lw=1.5)
        if unigram_entropy is not None:
            ax.axhline(unigram_entropy, color="gray", ls="--", lw=1, label="unigram entropy (validation)")
    return path


def plot_heatmap(routing: dict[str, Any], path: Path) -> Path:
    counts = torch.tensor(routing["counts"], dtype=torch.float32)
    return plot_routing_heatmap(counts, path, title=f"Validation tokens per expert, step {routing['step']}",
                                layer_labels=routing.get("layers"))


def load_table(routing: dict[str, Any]) -> str:
    """One line per MoE layer: max/mean load, coefficient of variation, least and most used expert."""
    counts = torch.tensor(routing["counts"], dtype=torch.float64)
    names = routing.get("layers") or [str(i) for i in range(len(counts))]
    width = max(len("layer"), *(len(n) for n in names))
    lines = [f"{'layer':<{width}}  {'max/mean':>8}  {'cv':>6}  {'min expert':>14}  {'max expert':>14}"]
    for name, row in zip(names, counts, strict=True):
        mean = float(row.mean()) or 1e-9
        share = row / max(float(row.sum()), 1e-9)
        lo, hi = int(row.argmin()), int(row.argmax())
        lines.append(f"{name:<{width}}  {float(row.max()) / mean:8.2f}  {float(row.std(unbiased=False)) / mean:6.2f}"
                     f"  {f'#{lo} {share[lo]:.1%}':>14}  {f'#{hi} {share[hi]:.1%}':>14}")
    return "\n".join(lines)





def routes_report(run_dir: str | Path, heatmap_path: str | Path | None = None) -> str:
    """What ``deepseek-moe routes RUN_DIR`` prints; redraws the heatmap (default RUN_DIR/routing_heatmap.png)."""
    import json

    from deepseek_moe.train.errors import TrainError
    from deepseek_moe.train.rundir import read_metrics

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TrainError(f"run directory {str(run_dir)!r} does not exist")
    path = run_dir / "routing.json"
    if not path.is_file():
        raise TrainError(f"{str(run_dir)!r} has no routing.json: the run has not reached a validation pass yet")
    try:
        routing = json.loads(path.read_text())
        counts = routing["counts"]
    except (json.JSONDecodeError, KeyError) as e:
        raise TrainError(f"{path} is corrupt: {e}") from e
    if not counts:
        return "the model has no MoE layers"
    out = plot_heatmap(routing, Path(heatmap_path) if heatmap_path else run_dir / "routing_heatmap.png")
    lines = [f"expert load per MoE layer over validation tokens at step {routing['step']} "
             f"({len(counts[0])} routed experts; max/mean 1.00 and cv 0.00 are perfectly balanced)",
             load_table(routing)]
    train = [r for r in read_metrics(run_dir) if r.get("kind") == "train"]
    if train:
        first, last = train[0], train[-1]
        lines.append(f"training batches: max/mean load {first['imbalance']:.2f} at step {first['step']} "
                     f"(stage {first['stage']}) -> {last['imbalance']:.2f} at step {last['step']} "
                     f"(stage {last['stage']}); dropped {last['dropped']:.1%}")
    lines.append(f"heatmap: {out}")
    return "\n".join(lines)
__all__ = ["load_table", "plot_heatmap", "plot_loss", "routes_report"]
