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

import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from deepseek_moe.ablate.report import write_report
from deepseek_moe.ablate.routing import altered_routing
from deepseek_moe.ablate.variants import (
    VARIANTS,
    AblationShape,
    count_variant,
    model_overrides,
    variant_config,
)
from deepseek_moe.config import _require
from deepseek_moe.train.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ModelSpec,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from deepseek_moe.train.errors import TrainError

REDUNDANCY_VARIANTS = ("deepseekmoe", "gshard_x1.5")  # paper §4.5, Fig. 4
SHARED_TEST_VARIANT = "deepseekmoe"  # paper §4.5: shared expert off, one more routed expert on


@dataclass(frozen=True, kw_only=True)
class AblationConfig:
    """One ablation: the base shape, the variants and seeds, and the one training recipe they all share."""

    shape: AblationShape = field(default_factory=AblationShape)
    variants: tuple[str, ...] = VARIANTS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 240  # sized in the README: 24 runs in about an hour on 2 idle CPU cores
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    eval_every: int = 20  # steps between validation passes (the curves' points)
    eval_batches: int = 4  # validation micro-batches per pass during training
    analysis_batches: int | None = None  # validation micro-batches for the final §4.5 losses; None: whole split
    max_masked_ratio: float = 0.375  # redundancy: mask k/N of the routed experts for k/N up to this
    data_paths: tuple[str, ...] = ()
    val_paths: tuple[str, ...] = ()
    cache_dir: str | None = None  # tokenizer and token arrays (data.cache_dir); None: ~/.cache/deepseek_moe
    device: str = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # as training's: "auto" is bf16 autocast where native
    threads: int = 0

    def __post_init__(self) -> None:
        _require(isinstance(self.shape, AblationShape), f"shape ({self.shape!r}) must be an AblationShape")
        _require(len(self.variants) > 0 and len(set(self.variants)) == len(self.variants),
                 f"variants ({self.variants!r}) must be distinct and not empty")
        for v in self.variants:
            _require(v in VARIANTS, f"variant {v!r} is not one of {', '.join(VARIANTS)}")
        _require(len(self.seeds) > 0 and all(isinstance(s, int) and s >= 0 for s in self.seeds)
                 and len(set(self.seeds)) == len(self.seeds), f"seeds ({self.seeds!r}) must be distinct ints >= 0")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"{name} ({value!r}) must be a positive integer")
        _require(self.analysis_batches is None or self.analysis_batches > 0,
                 f"analysis_batches ({self.analysis_batches!r}) must be positive or None")
        _require(self.lr > 0, f"lr ({self.lr!r}) must be > 0")
        _require(0 <= self.max_masked_ratio < 1, f"max_masked_ratio ({self.max_masked_ratio}) must be in [0, 1)")

    @property
    def tokens_per_run(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    def replace(self, **changes: Any) -> AblationConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def train_config(self, variant: str, seed: int, out: Path) -> TrainConfig:
        """The TrainConfig of one run: identical for all variants but ``model`` and ``seed``."""
        model_cfg = variant_config(variant, self.shape)
        return TrainConfig(
            model=ModelSpec(preset="tiny", overrides=model_overrides(model_cfg)),
            data=DataConfig(paths=self.data_paths, val_paths=self.val_paths, seq_len=self.seq_len,
                            vocab_size=self.shape.vocab_size, cache_dir=self.cache_dir),
            optim=OptimConfig(lr=self.lr),
            schedule=ScheduleConfig(steps=self.steps, batch_size=self.batch_size),
            checkpoint=CheckpointConfig(every=max(self.eval_every, self.steps // 4), keep_last=2),
            eval=EvalConfig(every=self.eval_every, batches=self.eval_batches, log_every=self.eval_every,
                            sample_tokens=0),
            seed=seed, device=self.device, dtype=self.dtype, out=str(out), threads=self.threads)


def full() -> AblationConfig:
    """The full comparison: every variant, 3 seeds, sized for about an hour on 2 idle CPU cores (README)."""
    return AblationConfig()


def quick() -> AblationConfig:
    """One seed and 100 steps: every variant in about 10 minutes on 2 idle CPU cores (README)."""
    return AblationConfig(seeds=(0,), steps=100, eval_every=10)


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
    result: dict[str, Any] = {
        "val_loss": float(summary["val_loss"]), "tokens_per_s": float(summary["tokens_per_s"]),
        "curve": [[r["step"], r["val_loss"]] for r in records if r.get("kind") == "val"],
    }
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
