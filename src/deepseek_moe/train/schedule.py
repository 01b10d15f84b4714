"""Learning-rate schedule (linear warm-up, cosine decay) and the three routing stages, as functions of the step."""

from __future__ import annotations

import math

from deepseek_moe.train.config import TrainConfig


def lr_factor(step: int, *, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): warm-up ramps 1/W .. 1, then a cosine
    from 1 down to ``min_lr_ratio`` at step ``steps - 1``, where it stays (an extended run's extra steps)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def routing_stage(cfg: TrainConfig, step: int) -> int:
    """1: uniform-routing warm-up, 2: learned routing with balancing, 3: fine-tuning with frozen experts.
    Steps past ``schedule.steps`` (``extra_steps``) stay in the stage of the last planned step."""
    steps = cfg.schedule.steps
    uniform_end, finetune_start = cfg.routing.stage_steps(steps)
    step = min(step, steps - 1)
    if step < uniform_end:
        return 1
    return 3 if step >= finetune_start else 2


__all__ = ["lr_factor", "routing_stage"]
