"""Expert FFNs: the SwiGLU feed-forward, and the routed experts stacked for grouped matrix products."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.kernels import mkl_grouped
from deepseek_moe.nn.compute_copy import compute_dtype, compute_weight
from deepseek_moe.nn.linear import Linear


class FeedForward(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x). Dense layers and the fused shared experts use it.

    ``n_shared_experts`` shared experts of width F are one FeedForward of width n_shared * F: the sum of
    their outputs equals one wider FFN's, and one wide matmul is faster than several narrow ones.
    """

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, inter_dim, bias=False)  # gate_proj
        self.w2 = Linear(inter_dim, dim, bias=False)  # down_proj
        self.w3 = Linear(dim, inter_dim, bias=False)  # up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def local_weights(*ws: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The experts held here: under expert parallelism the weights are DTensors sharded on the expert dim, and
    the dispatcher brings this process only the rows of its own experts (``to_local`` is differentiable)."""
    return tuple(w.to_local() if hasattr(w, "to_local") else w for w in ws)


def _grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm")


class RoutedExperts(nn.Module):
    """E SwiGLU experts of hidden width F, stacked so that tokens sorted by expert run as one grouped matmul.

    Parameters: ``w1`` (E, F, D) gate_proj, ``w2`` (E, D, F) down_proj, ``w3`` (E, F, D) up_proj. ``offset`` is
    the global index of the first expert held here (non-zero only under expert parallelism), ``n_experts`` the
    number held here; under expert parallelism the weights are DTensors of the global shape.
    """

    compute_copy_weights: ClassVar[tuple[str, ...]] = ("w1", "w2", "w3")  # nn/compute_copy.attach gives them copies

    def __init__(self, n_experts: int, dim: int, inter_dim: int, *, init_std: float = 0.02, offset: int = 0) -> None:
        super().__init__()
        self.n_experts, self.offset = n_experts, offset
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.init_std = init_std
        self.reset_parameters()
        self.use_grouped_mm = _grouped_mm_available()
        self.use_mkl_batch = True  # fp32 on CPU where torch's MKL is there (kernels/mkl_grouped.py)

    def reset_parameters(self) -> None:
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=self.init_std)

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor, gates_A: torch.Tensor | None = None) -> torch.Tensor:
        """Run each expert on its contiguous slice of rows.

        x_AD: rows sorted by expert, ``counts_E[e]`` rows for expert e. gates_A (optional): a per-row weight,
        applied to the (A, F) activation before the down projection, which costs F rather than D per row.
        """
        dtype = compute_dtype(x_AD)
        x_AD = x_AD.to(dtype)
        gates_A = gates_A.to(dtype) if gates_A is not None else None
        w1, w2, w3 = local_weights(self.w1, self.w2, self.w3)
        product: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
        if self.use_mkl_batch and mkl_grouped.fits(x_AD, w1):  # fp32 on CPU: all experts in one batched GEMM
            product = mkl_grouped.grouped_linear
        elif self.use_grouped_mm and self._grouped_mm_fits(dtype):
            w1, w2, w3 = (compute_weight(w, dtype) for w in (w1, w2, w3))
            offs_E = counts_E.cumsum(0).to(torch.int32)

            def product(x: torch.Tensor, w: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
                return F.grouped_mm(x, w.transpose(1, 2), offs=offs_E)
        else:
            return self.forward_loop(x_AD, counts_E, gates_A)
        h_AF = F.silu(product(x_AD, w1, counts_E)) * product(x_AD, w3, counts_E)
        if gates_A is not None:
            h_AF = h_AF * gates_A.unsqueeze(1)
        return product(h_AF, w2, counts_E)

    def _grouped_mm_fits(self, dtype: torch.dtype) -> bool:
        """grouped_mm takes fp32/bf16 operands whose row strides are multiples of 16 bytes."""
        if dtype not in (torch.float32, torch.bfloat16):
            return False
        _, inter_dim, dim = self.w1.shape
        return (dim * dtype.itemsize) % 16 == 0 and (inter_dim * dtype.itemsize) % 16 == 0

    def forward_loop(self, x_AD: torch.Tensor, counts_E: torch.Tensor,
                     gates_A: torch.Tensor | None = None) -> torch.Tensor:
        """The same as :meth:`forward`, one matmul per expert (dtypes or builds without grouped_mm).

        unbind() rather than ``w1[e]`` in the loop: indexing makes the backward zero-fill the whole stacked
        gradient once per expert.
        """
        sizes = counts_E.tolist()
        dtype = compute_dtype(x_AD)
        x_AD = x_AD.to(dtype)
        w1s, w2s, w3s = (compute_weight(w, dtype).unbind(0) for w in local_weights(self.w1, self.w2, self.w3))
        outs = []
        for x_eD, w1, w3 in zip(x_AD.split(sizes), w1s, w3s, strict=True):
            outs.append(F.silu(x_eD @ w1.t()) * (x_eD @ w3.t()))
        h_AF = torch.cat(outs)
        if gates_A is not None:
            h_AF = h_AF * gates_A.to(dtype).unsqueeze(1)
        return torch.cat([h_eF @ w2.t() for h_eF, w2 in zip(h_AF.split(sizes), w2s, strict=True)])
