"""RMSNorm: x / sqrt(mean(x^2) + eps) * weight, computed in float32 as DeepSeek's and transformers' code do."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.kernels.rms_norm import rms_norm_rows


class RMSNorm(nn.Module):
    """Root-mean-square layer norm over the last dimension. (..., dim) -> (..., dim) in the
    input dtype promoted with the weight's, as transformers does (equal dtypes in a cast model)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is torch.float32 and self.weight.dtype is torch.float32:
            y = rms_norm_rows(x, self.weight, self.eps)  # a decode step's few rows: one C++ call
            if y is not None:
                return y
            # More rows, autograd or reference_paths(): torch's fused op, the same float32 operations in the same
            # order as the formula below (bit-identical, tested), in one call instead of eight. (The C++ call above
            # sums the squares in another order: equal to rounding.)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in float32: the mean of squares over thousands of bf16 values loses too many bits.
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
