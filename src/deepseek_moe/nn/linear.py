"""The Linear every matrix weight of the layer and the model uses: ``nn.Linear`` with a bf16 compute copy, and at
inference on the CPU the fp32/bf16 kernel of ``kernels/float_gemm.cpp`` where it is faster than torch's matmul."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.kernels.float_matmul import float_matmul_kernel, torch_bf16_matmul_is_native
from deepseek_moe.nn.compute_copy import compute_dtype, compute_weight, copy_of
from deepseek_moe.nn.widen import widened_linear, widens

# Rows of x up to which fp32 weights take the kernel (bf16 weights always do, torch's bf16 matmul being the slow
# one on CPUs without AVX512-BF16). Measured on an AVX2 EPYC, 2 threads, 1024x5632 and 5632x1024: at 1 row the
# kernel matched MKL, at 4-16 rows it took 1/3 to 1/2 of MKL's time, at 64 rows MKL was up to 1.6x faster.
# Where torch's bf16 matmul is native (oneDNN: AVX-512, AMX) bf16 weights take the kernel up to these rows only.
FP32_KERNEL_MAX_ROWS = 16


class Linear(nn.Linear):
    """``nn.Linear`` whose weight comes from :func:`compute_weight` when autocast computes in another dtype."""

    compute_copy_weights: ClassVar[tuple[str, ...]] = ("weight",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if copy_of(self.weight) is None:  # first: meta tensors (shape inference) have no autocast state to ask
            if widens(x, self.weight):  # a frozen bf16 base under fp32 activations (nn/widen.py)
                return widened_linear(x, self.weight, self.bias)
            few_rows = x.numel() <= FP32_KERNEL_MAX_ROWS * x.shape[-1]
            if x.device.type == "cpu" and x.dtype == self.weight.dtype and (
                    (x.dtype == torch.bfloat16 and (few_rows or not torch_bf16_matmul_is_native()))
                    or (x.dtype == torch.float32 and few_rows)):
                y = float_matmul_kernel(x, self.weight)  # None under autograd, without a compiler, ...
                if y is not None:
                    return y if self.bias is None else y + self.bias
            return super().forward(x)
        dtype = compute_dtype(x)
        if dtype == self.weight.dtype:
            return super().forward(x)
        return F.linear(x, compute_weight(self.weight, dtype), self.bias)

    def input_grad_rows(self, dy_Mn: torch.Tensor, rows: slice) -> torch.Tensor:
        """dy (M, n) @ W[rows] (n, K): the fused loss's gradient through a frozen head (nn/cross_entropy.py)."""
        return dy_Mn @ self.weight[rows].to(dy_Mn.dtype)

    def matrix(self) -> torch.Tensor:
        """The (out, in) matrix this layer applies, for code that uses it other than through forward (MLA's
        absorbed attention folds wkv_b into the query and output): the weight, plus any update a subclass adds
        (an unmerged LoRA pair, adapters/lora.py)."""
        return self.weight


__all__ = ["Linear"]
