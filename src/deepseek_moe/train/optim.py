"""AdamW with two parameter groups: matrices decay, while norms, biases and other 1-D parameters do not."""

from __future__ import annotations

import torch
from torch import nn

from deepseek_moe.train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # fused: one pass over each tensor's parameter, gradient and moments instead of foreach's ~8 (one per
    # elementwise op); 3.4x faster than foreach on CPU for 32 x 704 x 1024 experts (benchmarks/train_speed.py),
    # where the optimizer step is a fifth of a bf16 training step. Falls back to foreach where fused is missing.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             **({"fused": True} if fused else {"foreach": True}))


__all__ = ["build_optimizer", "param_groups"]
