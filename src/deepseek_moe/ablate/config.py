"""``AblationConfig``: one ablation's settings (the variants, seeds and the training recipe they share), and the
two sizes docs/ablation.md describes (``full``, ``quick``). Apart from run.py so that the report reads it too."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deepseek_moe.ablate.variants import (
    BALANCE_VARIANTS,
    VARIANTS,
    AblationShape,
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

REDUNDANCY_VARIANTS = ("deepseekmoe", "gshard_x1.5")  # paper §4.5, Fig. 4
SHARED_TEST_VARIANT = "deepseekmoe"  # paper §4.5: shared expert off, one more routed expert on


@dataclass(frozen=True, kw_only=True)
class AblationConfig:
    """One ablation: the base shape, the variants and seeds, and the one training recipe they all share."""

    shape: AblationShape = field(default_factory=AblationShape)
    variants: tuple[str, ...] = VARIANTS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 240  # sized in docs/ablation.md: 24 runs in about an hour on 2 idle CPU cores
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
        known = (*VARIANTS, *BALANCE_VARIANTS)
        for v in self.variants:
            _require(v in known, f"variant {v!r} is not one of {', '.join(known)}")
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
    """The full comparison: every variant, 3 seeds, sized for about an hour on 2 idle CPU cores (docs/ablation.md)."""
    return AblationConfig()


def quick() -> AblationConfig:
    """One seed and 100 steps: every variant in about 10 minutes on 2 idle CPU cores (docs/ablation.md)."""
    return AblationConfig(seeds=(0,), steps=100, eval_every=10)


def balance() -> AblationConfig:
    """deepseekmoe against its balance variants (token dropping at a fixed and an adaptive capacity factor, the
    routing-entropy regulariser): 3 seeds of 100 steps, about 15 minutes on 2 idle CPU cores."""
    return AblationConfig(variants=("deepseekmoe", *BALANCE_VARIANTS), steps=100, eval_every=10)


__all__ = ["REDUNDANCY_VARIANTS", "SHARED_TEST_VARIANT", "AblationConfig", "balance", "full", "quick"]
