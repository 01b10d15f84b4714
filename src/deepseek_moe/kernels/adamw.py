"""One AdamW step on an fp32 weight that also writes its bf16 compute copy: the compiled kernel
(``adamw.cpp``) where it builds, else :func:`adamw_step_reference`, the same update in PyTorch ops; and the step
with bf16 moments (:func:`adamw_step_bf16_moments`, twin :func:`adamw_step_bf16_moments_reference`)."""

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


def adamw_step_bf16_moments_reference(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                                      exp_avg_sq: torch.Tensor, *, beta1: float, beta2: float, eps: float,
                                      decay: float, step_size: float, bc2_sqrt: float) -> None:
    """:func:`adamw_step_reference` on bf16 moments: widened (exactly), updated in fp32 with the weight, rounded
    back to nearest even."""
    m, v = exp_avg.float(), exp_avg_sq.float()
    adamw_step_reference(param, grad, m, v, None, beta1=beta1, beta2=beta2, eps=eps, decay=decay,
                         step_size=step_size, bc2_sqrt=bc2_sqrt)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def bf16_moments_kernel_takes(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                              exp_avg_sq: torch.Tensor) -> bool:
    """Whether :func:`adamw_step_bf16_moments` runs the compiled kernel on these tensors: plain (not DTensor)
    contiguous CPU fp32 weight and gradient, bf16 moments of the same size, the kernel built."""
    n = param.numel()
    return (load_adamw_library() is not None
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.is_contiguous() and t.numel() == n
                    for t in (param, grad, exp_avg, exp_avg_sq))
            and param.dtype == grad.dtype == torch.float32 and exp_avg.dtype == exp_avg_sq.dtype == torch.bfloat16)


def adamw_step_bf16_moments(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                            *, beta1: float, beta2: float, eps: float, decay: float, step_size: float,
                            bc2_sqrt: float) -> None:
    """:func:`adamw_step_bf16_moments_reference` in one pass over memory where the kernel takes the tensors
    (:func:`bf16_moments_kernel_takes`); it differs from the reference by the kernel's fused multiply-adds (an
    fp32 ulp of the weight, at most a bf16 ulp of a moment where that tips its rounding)."""
    if not bf16_moments_kernel_takes(param, grad, exp_avg, exp_avg_sq):
        adamw_step_bf16_moments_reference(param, grad, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps,
                                          decay=decay, step_size=step_size, bc2_sqrt=bc2_sqrt)
        return
    lib = load_adamw_library()
    assert lib is not None  # bf16_moments_kernel_takes checked
    lib.dsm_adamw_step_bf16_moments(param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                                    param.numel(), beta1, beta2, eps, decay, step_size, bc2_sqrt)


__all__ = ["adamw_step", "adamw_step_bf16_moments", "adamw_step_bf16_moments_reference", "adamw_step_reference",
           "bf16_moments_kernel_takes"]
