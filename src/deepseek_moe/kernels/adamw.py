"""One AdamW step on an fp32 weight that also writes its bf16 compute copy: the compiled kernel
(``adamw.cpp``) where it builds, else :func:`adamw_step_reference`, the same update in PyTorch ops."""

from __future__ import annotations

import torch

from deepseek_moe.kernels.cpu_build import load_adamw_library


def adamw_step_reference(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                         copy: torch.Tensor | None, *, beta1: float, beta2: float, eps: float, decay: float,
                         step_size: float, bc2_sqrt: float) -> None:
    """AdamW as torch.optim.AdamW computes it (decoupled decay, bias-corrected moments), in place:
    ``decay`` = 1 - lr * weight_decay, ``step_size`` = lr / (1 - beta1^t), ``bc2_sqrt`` = sqrt(1 - beta2^t)."""
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    param.mul_(decay).addcdiv_(exp_avg, denom, value=-step_size)
    if copy is not None:
        copy.copy_(param)


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               copy: torch.Tensor | None, *, beta1: float, beta2: float, eps: float, decay: float, step_size: float,
               bc2_sqrt: float) -> None:
    """:func:`adamw_step_reference` in one pass over memory (contiguous fp32 CPU tensors, a bf16 copy)."""
    lib = load_adamw_library()
    tensors = (param, grad, exp_avg, exp_avg_sq)
    if (lib is None or any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
                           or t.numel() != param.numel() for t in tensors)
            or (copy is not None and (copy.dtype != torch.bfloat16 or not copy.is_contiguous()
                                      or copy.numel() != param.numel()))):
        adamw_step_reference(param, grad, exp_avg, exp_avg_sq, copy, beta1=beta1, beta2=beta2, eps=eps, decay=decay,
                             step_size=step_size, bc2_sqrt=bc2_sqrt)
        return
    lib.dsm_adamw_step(param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                       copy.data_ptr() if copy is not None else None, param.numel(), beta1, beta2, eps, decay,
                       step_size, bc2_sqrt)


__all__ = ["adamw_step", "adamw_step_reference"]
