"""``run_ablation(AblationConfig)``: train every variant for every seed through the training loop, analyse, report.

    DIR/ablation.json                 the settings (a rerun with other settings is refused, not mixed in)
    DIR/runs/<variant>/seed<k>/       an ordinary training run directory (resumable: deepseek-moe train --resume)
    DIR/runs/<variant>/seed<k>/analysis.json   final load, the redundancy and shared-expert losses
    DIR/results.json, results.md, *.png

Every run goes through :func:`deepseek_moe.train.run` with the same TrainConfig except the model's FFN and the
seed, so data order, token budget, optimiser, schedule and routing stages are the same for every variant; the
seed sets the initialisation, the data order and the routers' draws. A run with a finished summary is skipped;
a run with a checkpoint resumes from it; anything else starts afresh.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deepseek_moe.ablate.config import REDUNDANCY_VARIANTS, SHARED_TEST_VARIANT, AblationConfig, full, quick
from deepseek_moe.ablate.report import write_report
from deepseek_moe.ablate.routing import altered_routing
from deepseek_moe.ablate.variants import (
    count_variant,
    variant_config,
)
from deepseek_moe.train.errors import TrainError

# ---- one run ---------------------------------------------------------------------------------------------------

def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / variant / f"seed{seed}"


def _summary(path: Path) -> dict[str, Any] | None:
    """The summary record of a finished run's metrics.jsonl, else None."""
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summaries = [r for r in records if r.get("kind") == "summary"]
    return summaries[-1] if summaries and (path / "model" / "config.json").is_file() else None


def train_one(cfg: AblationConfig, out: Path, variant: str, seed: int, *, progress: bool,
              log: Callable[[str], None]) -> None:
    """Train (or resume, or skip) one variant for one seed."""
    from deepseek_moe.train.checkpoint import step_dirs
    from deepseek_moe.train.loop import run

    path = run_dir(out, variant, seed)
    if _summary(path) is not None:
        log(f"{variant} seed {seed}: finished earlier, skipped")
        return
    resume = bool(step_dirs(path / "state")) if (path / "state").is_dir() else False
    log(f"{variant} seed {seed}: {'resuming' if resume else 'training'} ({path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    run(cfg.train_config(variant, seed, path), resume=resume, force=not resume, progress=progress)


# ---- analysis of one trained run ---------------------------------------------------------------------------------

def analyse_one(cfg: AblationConfig, out: Path, variant: str, seed: int) -> dict[str, Any]:
    """Final expert load and, for the §4.5 variants, the redundancy and shared-expert losses (cached)."""
    from deepseek_moe.device import resolve_device
    from deepseek_moe.io import load_pretrained
    from deepseek_moe.train.build import autocast_dtype, load_data
    from deepseek_moe.train.routing import load_summary
    from deepseek_moe.train.rundir import write_json

    path = run_dir(out, variant, seed)
    cached = path / "analysis.json"
    if cached.is_file():
        return dict(json.loads(cached.read_text()))
    summary = _summary(path)
    if summary is None:
        raise TrainError(f"{path} has not finished training")
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    result: dict[str, Any] = {
        "val_loss": float(summary["val_loss"]), "tokens_per_s": float(summary["tokens_per_s"]),
        "curve": [[r["step"], r["val_loss"]] for r in records if r.get("kind") == "val"],
        # over the training steps: the share of assignments dropped, the routing entropy, the capacity factors
        "dropped": sum(r["dropped"] for r in train) / max(len(train), 1),
        "entropy_curve": [[r["step"], r["routing_entropy"]] for r in train if "routing_entropy" in r],
    }
    capacity = [sum(r["capacity"]) / len(r["capacity"]) for r in train if r.get("capacity")]
    if capacity:
        result["capacity_mean"] = sum(capacity) / len(capacity)
        result["capacity_final"] = capacity[-1]
    routing_path = path / "routing.json"
    if routing_path.is_file():
        counts = torch.tensor(json.loads(routing_path.read_text())["counts"], dtype=torch.float64)
        loads = load_summary(counts)
        result["load_max_over_mean"] = loads["imbalance"]
        result["load_cv"] = loads["cv"]
    if variant in (*REDUNDANCY_VARIANTS, SHARED_TEST_VARIANT):
        train_cfg = cfg.train_config(variant, seed, path)
        data = load_data(train_cfg)
        batches = data.val.fixed_batches(cfg.batch_size, cfg.analysis_batches)
        device = resolve_device(cfg.device)
        amp = autocast_dtype(cfg.dtype, device)  # the precision training validated in
        model = load_pretrained(path / "model", device=device).eval()
        loss = _eval_loss(model, batches, amp)
        result["analysis_loss"] = loss
        if variant in REDUNDANCY_VARIANTS:
            result["redundancy"] = _redundancy(model, batches, cfg, loss, amp)
        if variant == SHARED_TEST_VARIANT:
            with altered_routing(model, extra=1, drop_shared=True):
                result["shared_disabled_loss"] = _eval_loss(model, batches, amp)
    write_json(cached, result)
    return result


def masked_counts(n_routed: int, n_activated: int, n_experts: int, max_ratio: float) -> list[tuple[float, int]]:
    """(ratio, experts masked) for ratios k/N (N: the conventional expert count) up to ``max_ratio``, as long as
    K experts remain; a ratio r masks round(r * n_routed) of the layer's routed experts."""
    points = []
    for k in range(n_experts + 1):
        ratio = k / n_experts
        n = round(ratio * n_routed)
        if ratio > max_ratio + 1e-9 or n + n_activated > n_routed:
            break
        points.append((ratio, n))
    return points


def _redundancy(model: Any, batches: list[torch.Tensor], cfg: AblationConfig, loss0: float,
                amp: torch.dtype | None) -> list[list[float]]:
    moe = model.config.moe
    points = []
    for ratio, n in masked_counts(moe.n_routed_experts, moe.n_activated_experts, cfg.shape.n_experts,
                                  cfg.max_masked_ratio):
        if n == 0:
            points.append([ratio, 0, loss0])
            continue
        with altered_routing(model, skip_top=n):
            points.append([ratio, n, _eval_loss(model, batches, amp)])
    return points


@torch.no_grad()
def _eval_loss(model: Any, batches: list[torch.Tensor], amp: torch.dtype | None) -> float:
    """Mean cross-entropy (nats/token) over ``batches``, as the trainer's validation computes it."""
    from deepseek_moe.train.build import autocast

    device = next(model.parameters()).device
    nll, n = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast(device, amp):
            out = model(batch, labels=batch)
        k = batch.numel() - batch.shape[0]
        nll += float(out.ce_loss) * k
        n += k
    return nll / n


# ---- the whole ablation ----------------------------------------------------------------------------------------

def run_ablation(cfg: AblationConfig, out: str | Path, *, progress: bool = True) -> list[dict[str, Any]]:
    """Train and analyse every (variant, seed) not done yet in ``out``, then write the results there.

    Returns the rows of results.json. Seeds are the outer loop, so a partly finished ablation has whole seeds.
    """
    from deepseek_moe.train.rundir import write_json

    out = Path(out)
    log = _printer(progress)
    _check_settings(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ablation.json", cfg.to_dict())
    counts = {v: count_variant(variant_config(v, cfg.shape), seq_len=cfg.seq_len) for v in cfg.variants}
    log(format_counts(counts))
    for seed in cfg.seeds:
        for variant in cfg.variants:
            train_one(cfg, out, variant, seed, progress=progress, log=log)
            analyse_one(cfg, out, variant, seed)
    analyses = {v: [analyse_one(cfg, out, v, s) for s in cfg.seeds] for v in cfg.variants}
    rows = write_report(cfg, out, counts, analyses)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'} and the plots")
    return rows


def _check_settings(cfg: AblationConfig, out: Path) -> None:
    """A directory holding an ablation with other settings is refused (its runs would not be comparable)."""
    saved_path = out / "ablation.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    mine = json.loads(json.dumps(cfg.to_dict()))
    # Which variants and seeds run may change (add a seed later); the recipe may not.
    differ = sorted(k for k in set(saved) | set(mine) if k not in ("variants", "seeds") and saved.get(k) != mine.get(k))
    if differ:
        raise TrainError(f"{out} holds an ablation with other settings ({', '.join(differ)} differ); use another "
                         "--out, or the same settings to continue it")


def format_counts(counts: dict[str, Any]) -> str:
    """The parameter table printed before training, so equal budgets are seen, not assumed."""
    lines = [f"{'variant':18s} {'total':>10s} {'activated':>10s} {'FFN total':>10s} {'FFN act.':>10s} "
             f"{'router':>7s} {'MFLOP/tok':>9s}"]
    for v, c in counts.items():
        lines.append(f"{v:18s} {c.total_params:10,d} {c.activated_params:10,d} {c.ffn_total:10,d} "
                     f"{c.ffn_activated:10,d} {c.router_params:7,d} {c.flops_per_token / 1e6:9.2f}")
    return "\n".join(lines)


def _printer(enabled: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if enabled:
            print(message, file=sys.stdout, flush=True)
    return log


__all__ = ["AblationConfig", "REDUNDANCY_VARIANTS", "SHARED_TEST_VARIANT", "analyse_one", "format_counts", "full",
           "masked_counts", "quick", "run_ablation", "run_dir", "train_one"]
