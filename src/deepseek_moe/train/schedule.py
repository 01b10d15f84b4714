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


def entropy_scale(cfg: TrainConfig, step: int) -> float:
    """What multiplies MoEConfig.entropy_loss_alpha at ``step``: 1 when learned routing starts (the end of the
    uniform warm-up), falling linearly to 0 over ``routing.entropy_decay_fraction`` of all steps, then 0; 1
    throughout when that is None. Early is when routing can collapse before the experts differ; later, spread-out
    routing would fight the specialisation the model is trained for."""
    fraction = cfg.routing.entropy_decay_fraction
    if fraction is None:
        return 1.0
    start, _ = cfg.routing.stage_steps(cfg.schedule.steps)
    span = max(1, round(fraction * cfg.schedule.steps))
    return min(1.0, max(0.0, 1.0 - (step - start) / span))


__all__ = ["entropy_scale", "lr_factor", "routing_stage"]
