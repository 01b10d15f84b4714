"""RMSNorm of a few fp32 rows in one C++ call (``rms_norm.cpp``): a decode step's norms.

torch's ``rms_norm`` is ~10 operations on CPU; inside a decode step, between kernels that leave its code and data
cold, one call of a 1,024-wide row took ~50 us, and the mid-size model's step runs 25 (~1.3 ms of ~14). The
readable reference is :class:`deepseek_moe.model.norm.RMSNorm`'s formula; :func:`rms_norm_rows` returns None
wherever the kernel does not apply (no compiler, autograd, not fp32 on the CPU, more than MAX_ROWS rows, inside
``reference_paths()``), and the caller's torch path runs.
"""

from __future__ import annotations

import torch

from deepseek_moe.kernels import cpu_build
from deepseek_moe.kernels.switch import fast_paths_enabled

# Rows up to which the single-threaded kernel runs: a decode step's or a verification's few tokens; a prefill's
# thousands of rows are torch's (its parallel loops).
MAX_ROWS = 64


def kernel_available() -> bool:
    """Whether the compiled kernel serves the norms of decode steps here (for ``info`` and benchmarks)."""
    return cpu_build.load_rms_norm_library() is not None


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x (..., D) fp32 normalised over its last dimension and scaled by ``weight`` (D,) fp32, or None where the
    kernel does not apply."""
    if not fast_paths_enabled():  # first: under tracing, the shape test below would become a guard
        return None
    D = x.shape[-1]
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu"
            or x.numel() > MAX_ROWS * D or D == 0
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    if weight.shape != (D,):
        raise ValueError(f"rms_norm_rows: weight {tuple(weight.shape)} must be ({D},) for x {tuple(x.shape)}")
    lib = cpu_build.load_rms_norm_library()
    if lib is None:
        return None
    x = x.contiguous()
    w = weight.contiguous()
    y = torch.empty_like(x)
    lib.dsm_rms_norm(x.data_ptr(), D, x.numel() // D, D, w.data_ptr(), eps, y.data_ptr(), D)
    return y


__all__ = ["MAX_ROWS", "kernel_available", "rms_norm_rows"]
