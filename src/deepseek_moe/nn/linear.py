"""The Linear every matrix weight of the layer and the model uses: ``nn.Linear`` with a bf16 compute copy."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.nn.compute_copy import compute_dtype, compute_weight, copy_of


class Linear(nn.Linear):
    """``nn.Linear`` whose weight comes from :func:`compute_weight` when autocast computes in another dtype."""

    compute_copy_weights: ClassVar[tuple[str, ...]] = ("weight",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if copy_of(self.weight) is None:  # first: meta tensors (shape inference) have no autocast state to ask
            return super().forward(x)
        dtype = compute_dtype(x)
        if dtype == self.weight.dtype:
            return super().forward(x)
        return F.linear(x, compute_weight(self.weight, dtype), self.bias)

    def matrix(self) -> torch.Tensor:
        """The (out, in) matrix this layer applies, for code that uses it other than through forward (MLA's
        absorbed attention folds wkv_b into the query and output): the weight, plus any update a subclass adds
        (an unmerged LoRA pair, adapters/lora.py)."""
        return self.weight


__all__ = ["Linear"]
