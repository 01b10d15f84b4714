"""AdamW whose first and second moments are stored in bf16 (DeepSeek-V3 §3.3.3: "we adopt the BF16 data format
instead of FP32 to track the first and second moments in the AdamW optimizer, without incurring observable
performance degradation"). The moments are 8 of the 16 bytes per trained parameter that AdamW adds to an fp32
weight and its gradient; storing them in bf16 halves that: 0.94 GB for the 235M LoRA parameters of V2-Lite.

Each step widens one parameter's moments to fp32, applies torch's AdamW update to them and the fp32 weight
(:func:`deepseek_moe.kernels.adamw.adamw_step_reference`, the same operations in the same order as
``torch.optim.AdamW(foreach=False)``), and rounds them back to bf16 (round to nearest even). The weight itself
moves with the fp32 moments of that step; only what is carried to the next step is rounded. So the result is
exactly torch's AdamW with the moments rounded to bf16 after every step. That is the reference path (inside
``kernels.switch.reference_paths()``, or for tensors the kernel does not take); by default contiguous CPU
parameters go through ``kernels/adamw.cpp``'s one-pass kernel, equal to it up to the kernel's fused
multiply-adds (an fp32 ulp of the weight; a bf16 ulp of a moment where that tips its rounding).

Why β2 matters: bf16 keeps 8 significant bits, so a value moves only when a change exceeds half its spacing,
2^-9..2^-8 of the value. The second moment decays by the factor β2 each step, a relative change of 1 - β2: with
β2 = 0.999 (torch's default) that is 0.001 < 2^-9 and rounds away, so v never decays and only grows at gradient
spikes; the step size of a weight whose gradients shrink stays small for good. DeepSeek trains with
β2 = 0.95 (0.05 = 12.8 * 2^-8). This class refuses any β with 1 - β < 2^-7 (below, decay steps of one bf16 ulp
or less, which round to even unpredictably).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from typing import Any

import torch

from deepseek_moe.kernels.adamw import (
    adamw_step_bf16_moments,
    adamw_step_bf16_moments_reference,
    bf16_moments_kernel_takes,
)
from deepseek_moe.kernels.switch import fast_paths_enabled

MOMENTS = ("exp_avg", "exp_avg_sq")
MIN_ONE_MINUS_BETA = 2.0 ** -7  # see the module docstring


def check_betas(betas: tuple[float, float], what: str = "betas") -> None:
    """Raise ValueError unless both moments' decay per step survives bf16 rounding: 1 - β >= 2^-7.

    Refused rather than warned: with a smaller 1 - β the moment stops decaying altogether (the multiply by β
    rounds back to the same bf16 value), which is not a loss of precision but a different optimizer, and it
    fails silently (the loss still falls, more slowly). The fix is one flag away (fp32 moments or β2 <= 0.99)."""
    for name, beta in zip(("beta1", "beta2"), betas, strict=True):
        if 1.0 - float(beta) < MIN_ONE_MINUS_BETA:
            raise ValueError(f"{what} ({tuple(betas)!r}): {name} = {beta} leaves 1 - {name} = {1.0 - float(beta):.3g} "
                             f"below bf16's resolution (2^-7 = {MIN_ONE_MINUS_BETA:.3g}), so bf16 moments would stop "
                             f"decaying; use {name} <= {1.0 - MIN_ONE_MINUS_BETA:.4f} (DeepSeek's betas are (0.9, 0.95)) "
                             "or float32 moments")


CHUNK = 1 << 16  # elements updated at a time: the fp32 moments and temporaries (~1.3 MB) stay in L2


def _chunks(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Matching slices of equally shaped tensors, CHUNK elements each where all are contiguous (the update is
    elementwise, so slicing changes no value); else the whole tensors. Bounds the widened fp32 moments and the
    update's temporaries to a chunk instead of a whole parameter (64 x 2048 x 16 expert adapters: 4 x 8 MB), and
    keeps the dozen passes over a chunk in cache."""
    if not all(t.is_contiguous() for t in tensors):
        return [tensors]
    flat = [t.view(-1) for t in tensors]
    return [tuple(f[i:i + CHUNK] for f in flat) for i in range(0, flat[0].numel(), CHUNK)]


class NarrowMomentsAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (decoupled weight decay, bias correction) with ``exp_avg`` and ``exp_avg_sq`` kept in
    bf16 between steps. fp32 parameters only. ``state_dict``/``load_state_dict``, param groups and LR schedulers
    are AdamW's; a loaded state's moments are narrowed to bf16 again (torch casts them to the parameter's dtype),
    so a resumed run holds and computes exactly what the uninterrupted one does."""

    moments_dtype = torch.bfloat16

    def __init__(self, params: Any, **kwargs: Any) -> None:
        if kwargs.get("fused") or kwargs.get("foreach"):
            raise ValueError("NarrowMomentsAdamW steps one parameter at a time (its fp32 moments live only during "
                             "that parameter's update): fused and foreach must be off")
        kwargs.setdefault("betas", (0.9, 0.95))  # torch's default β2 = 0.999 is refused (check_betas)
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]:
                raise ValueError("NarrowMomentsAdamW implements plain AdamW: amsgrad, maximize, capturable and "
                                 "differentiable must be off")
            check_betas(group["betas"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            beta1, beta2 = (float(b) for b in group["betas"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.float32 or p.grad.dtype != torch.float32:
                    raise TypeError(f"NarrowMomentsAdamW updates fp32 parameters with fp32 gradients; got a "
                                    f"{p.dtype} parameter of shape {tuple(p.shape)} with a {p.grad.dtype} gradient")
                if p.grad.is_sparse:
                    raise TypeError(f"NarrowMomentsAdamW does not take sparse gradients (parameter of shape "
                                    f"{tuple(p.shape)})")
                state = self.state[p]
                if not state:  # AdamW's keys, so state_dicts move between the two
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype,
                                                           memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()  # as torch's single-tensor AdamW reads it
                # torch computes the corrections as 1 - beta ** step and (1 - beta2 ** step) ** 0.5, in Python floats
                hyper = dict(beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                             decay=1.0 - lr * float(group["weight_decay"]), step_size=lr / (1.0 - beta1 ** t),
                             bc2_sqrt=(1.0 - beta2 ** t) ** 0.5)
                # Under FSDP2 each is a DTensor sharded alike: the update is elementwise, so it runs on the local
                # shards (a DTensor's data_ptr is not its shard's: the kernel would write through null).
                tensors = tuple(t.to_local() if hasattr(t, "to_local") else t
                                for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"]))
                if fast_paths_enabled() and bf16_moments_kernel_takes(*tensors):
                    adamw_step_bf16_moments(*tensors, **hyper)  # one pass, in registers (kernels/adamw.cpp)
                    torch.autograd.graph.increment_version(p)  # written through a pointer: tell autograd
                    continue
                for chunk in _chunks(*tensors):
                    adamw_step_bf16_moments_reference(*chunk, **hyper)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """AdamW's, except the moments: torch's load casts every floating state tensor to its parameter's dtype
        (fp32), which would double their memory until the next narrowing; they are taken aside, the rest loaded
        by torch, and the moments put back in bf16 (exact for moments saved by this class; rounded for fp32 ones)."""
        moments = {pid: {k: v for k, v in entry.items() if k in MOMENTS} for pid, entry in state_dict["state"].items()}
        rest = {**state_dict, "state": {pid: {k: v for k, v in entry.items() if k not in MOMENTS}
                                        for pid, entry in state_dict["state"].items()}}
        super().load_state_dict(rest)  # validates the groups' sizes
        for group in self.param_groups:  # torch's load takes the saved groups' betas: a β2 this class refuses too
            check_betas(group["betas"])
        # torch's mapping from saved ids to parameters: the groups' parameters in order
        params = dict(zip(chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                          chain.from_iterable(g["params"] for g in self.param_groups), strict=True))
        for pid, entry in moments.items():
            if not entry:
                continue
            if pid not in params:
                raise ValueError(f"optimizer state for parameter id {pid!r} names no parameter of the param groups")
            p = params[pid]
            for key, value in entry.items():
                # as torch's load: no copy where nothing changes (a state loaded from this class's state_dict)
                self.state[p][key] = value.to(dtype=self.moments_dtype, device=p.device)


__all__ = ["MIN_ONE_MINUS_BETA", "NarrowMomentsAdamW", "check_betas"]
