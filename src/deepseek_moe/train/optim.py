"""AdamW with two parameter groups (matrices decay; norms, biases and other 1-D parameters do not), and
:class:`AdamWCopies`, the same AdamW whose step also rewrites the weights' bf16 compute copies."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deepseek_moe.kernels.adamw import adamw_step
from deepseek_moe.nn.compute_copy import copy_of, park_grads
from deepseek_moe.train.config import OptimConfig
from deepseek_moe.train.narrow_moments import NarrowMomentsAdamW


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class AdamWCopies(torch.optim.AdamW):
    """torch.optim.AdamW (fused) that updates each weight with a compute copy (``nn/compute_copy.py``) in one
    pass of ``kernels/adamw.cpp``, which writes the new bf16 copy as it writes the new master; the others go
    through torch's step. The update is AdamW's to float rounding (the kernel's operation order and fused
    multiply-adds differ from torch's by an ulp); state, state_dict and hyper-parameters are AdamW's, so
    checkpoints move freely between the two.

    The bf16 training step this is for reads every master once per step instead of twice, and allocates no
    weight copies (benchmarks/train_speed.py, docs/performance.md).
    """

    writes_compute_copies = True  # compute_copy's global step hook leaves this optimizer's copies alone

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]:
                raise ValueError("AdamWCopies implements plain AdamW: amsgrad, maximize, capturable and "
                                 "differentiable must be off")

    @staticmethod
    def takes(p: torch.Tensor) -> bool:
        """Whether the fused pass updates ``p``: a contiguous fp32 CPU weight with a bf16 copy (which the pass
        rewrites whole, stale or not) and a dense fp32 grad."""
        copy = copy_of(p)
        return (copy is not None and copy.tensor.dtype == torch.bfloat16 and p.device.type == "cpu" and p.dtype == torch.float32
                and p.is_contiguous() and p.grad is not None and not p.grad.is_sparse
                and p.grad.dtype == torch.float32 and p.grad.is_contiguous())

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        held: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, grad) done here, hidden from torch's step
        for group in self.param_groups:
            lr = float(group["lr"])
            beta1, beta2 = (float(b) for b in group["betas"])
            for p in group["params"]:
                if not self.takes(p):
                    continue
                state = self.state[p]
                if not state:  # as AdamW initialises it, so state_dicts are interchangeable
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                copy = copy_of(p)
                assert copy is not None  # takes() checked
                adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"], copy.tensor, beta1=beta1,
                           beta2=beta2, eps=float(group["eps"]), decay=1.0 - lr * float(group["weight_decay"]),
                           step_size=lr / (1.0 - beta1 ** t), bc2_sqrt=math.sqrt(1.0 - beta2 ** t))
                torch.autograd.graph.increment_version(p)  # written through a pointer: tell autograd
                copy.mark_synced(p)
                held.append((p, p.grad))
                p.grad = None
        # torch's step for the rest, without its step hooks (this call's own wrapper runs them once)
        torch_step = torch.optim.AdamW.step
        torch_step = getattr(torch_step, "__wrapped__", torch_step) if getattr(torch_step, "hooked", False) else torch_step
        try:
            torch_step(self)
        finally:
            for p, grad in held:
                p.grad = grad
        done = {id(p) for p, _ in held}
        for group in self.param_groups:  # torch's fused kernel wrote these without bumping their versions
            for p in group["params"]:
                copy = copy_of(p)
                if copy is not None and id(p) not in done and p.grad is not None:
                    copy.mark_stale()
        return loss


    def zero_grad(self, set_to_none: bool = True) -> None:
        """As AdamW's; with ``set_to_none`` the gradients of weights with compute copies are parked for the
        next backward to write into (``ComputeCopy.park_grad``) instead of freed."""
        if set_to_none:
            park_grads(p for group in self.param_groups for p in group["params"])
        super().zero_grad(set_to_none)


def adamw_class(model: nn.Module) -> type[torch.optim.AdamW]:
    """:class:`AdamWCopies` when some weight of ``model`` has a compute copy, else torch's AdamW."""
    return AdamWCopies if any(copy_of(p) is not None for p in model.parameters()) else torch.optim.AdamW


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``model``; :class:`AdamWCopies` when some weight has a compute copy; with
    ``cfg.moments == "bfloat16"`` :class:`NarrowMomentsAdamW` (bf16 moments), compute copies or not."""
    if cfg.moments == "bfloat16":
        # A plain AdamW to compute_copy's global step hook (no writes_compute_copies): after each step it marks
        # the copies stale and they are rebuilt at their next use, which is correct, only without AdamWCopies'
        # single pass that writes master and copy together.
        return NarrowMomentsAdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    # fused: one pass over each tensor's parameter, gradient and moments instead of foreach's ~8 (one per
    # elementwise op); 3.4x faster than foreach on CPU for 32 x 704 x 1024 experts (benchmarks/train_speed.py),
    # where the optimizer step is a fifth of a bf16 training step. Falls back to foreach where fused is missing.
    # Only what trains counts: a LoRA base's frozen int8 embedding codes are never stepped.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for p in model.parameters() if p.requires_grad)
    return adamw_class(model)(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                **({"fused": True} if fused else {"foreach": True}))


__all__ = ["AdamWCopies", "adamw_class", "build_optimizer", "param_groups"]
