"""Expert FFNs: the SwiGLU feed-forward, and the routed experts stacked for grouped matrix products."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x). Dense layers and the fused shared experts use it.

    ``n_shared_experts`` shared experts of width F are one FeedForward of width n_shared * F: the sum of
    their outputs equals one wider FFN's, and one wide matmul is faster than several narrow ones.
    """

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate_proj
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down_proj
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
