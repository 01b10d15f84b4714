"""Expert FFNs: the SwiGLU feed-forward, and the routed experts stacked for grouped matrix products."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.kernels import float_matmul, mkl_grouped
from deepseek_moe.nn.compute_copy import compute_dtype, compute_weight
from deepseek_moe.nn.linear import Linear
from deepseek_moe.nn.widen import widened_grouped, widens


class _SwiGLU(torch.autograd.Function):
    """silu(g) * u keeping g and u in ``saved_dtype`` for the backward, which recomputes silu from them: autograd
    through the plain expression keeps g, silu(g) and u at full width."""

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, u: torch.Tensor, saved_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(g.to(saved_dtype), u.to(saved_dtype))
        ctx.dtype = g.dtype
        return F.silu(g) * u

    @staticmethod
    def backward(ctx: Any, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        g, u = (t.to(ctx.dtype) for t in ctx.saved_tensors)
        sig = torch.sigmoid(g)
        du = dh * (g * sig)
        dg = dh * u * sig * (1 + g * (1 - sig))  # d silu(g) / dg = sig + g sig (1 - sig)
        return dg, du, None


class FeedForward(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x). Dense layers and the fused shared experts use it.

    ``n_shared_experts`` shared experts of width F are one FeedForward of width n_shared * F: the sum of
    their outputs equals one wider FFN's, and one wide matmul is faster than several narrow ones.
    ``saved_dtype`` (None: autograd's own): keep w1's and w3's outputs in that dtype for the backward (e.g. bf16
    under LoRA on a quantised V2-Lite: its shared experts kept 23 MB a layer at 512 tokens, now 12), the forward
    unchanged, the gradients at that rounding.
    """

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, inter_dim, bias=False)  # gate_proj
        self.w2 = Linear(inter_dim, dim, bias=False)  # down_proj
        self.w3 = Linear(dim, inter_dim, bias=False)  # up_proj
        self.saved_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.saved_dtype is not None and torch.is_grad_enabled():
            return self.w2(_SwiGLU.apply(self.w1(x), self.w3(x), self.saved_dtype))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def quantised_codes(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int] | None:
        """(codes and scales of w1, w2, w3, group size) where all three are plain quantised products in one format
        (``plain_codes``: a QuantLinear without bias, hook or adapter; w1 and w3 of one width) and nothing hooks
        this module: a fused call (the MoE layer's, a dense block's) may then run it as one expert. Else None."""
        if self._forward_hooks or self._forward_pre_hooks:
            return None
        codes = {}
        for name in ("w1", "w2", "w3"):
            plain = getattr(getattr(self, name), "plain_codes", None)
            got = plain() if callable(plain) else None
            if got is None:
                return None
            codes[name] = got
        sizes = {getattr(getattr(self, name), "group_size", None) for name in ("w1", "w2", "w3")}
        if len(sizes) != 1 or codes["w1"][0].dtype != codes["w3"][0].dtype:
            return None
        (size,) = sizes
        return (codes, size) if isinstance(size, int) else None


def local_weights(*ws: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The experts held here: under expert parallelism the weights are DTensors sharded on the expert dim, and
    the dispatcher brings this process only the rows of its own experts (``to_local`` is differentiable)."""
    return tuple(w.to_local() if hasattr(w, "to_local") else w for w in ws)


def _grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm")


# (x_AN, w_EMN, counts_E) -> (A, M): each expert's rows times its matrix transposed.
GroupedProduct = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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
        self.adapter: ExpertAdapter | None = None  # an nn.Module when set: its parameters are the model's

    def reset_parameters(self) -> None:
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=self.init_std)

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor, gates_A: torch.Tensor | None = None, *,
                rows_A: torch.Tensor | None = None) -> torch.Tensor:
        """Run each expert on its contiguous slice of rows.

        x_AD: rows sorted by expert, ``counts_E[e]`` rows for expert e; with ``rows_A``, x is (T, D) and the rows
        are ``x[rows_A]`` (the gather done here, so a path that keeps rows for the backward can keep x instead of
        its K-fold gathered copy). gates_A (optional): a per-row weight,
        applied to the (A, F) activation before the down projection, which costs F rather than D per row.
        Each grouped product takes the fastest path its operands fit (:meth:`product`); ``adapter`` (per-expert
        low-rank terms, deepseek_moe/adapters/) adds its own grouped products beside the experts'.
        """
        if rows_A is not None:
            x_AD = x_AD.index_select(0, rows_A)
        if self.adapter is None and _fused_kernel_fits(x_AD, self.w1):
            y_AD = float_matmul.float_experts_kernel(x_AD, counts_E, gates_A, *local_weights(self.w1, self.w2, self.w3))
            if y_AD is not None:
                return y_AD
        return self._swiglu(x_AD, counts_E, gates_A, self.product)

    def one_token(self, x_1D: torch.Tensor, experts_K: torch.Tensor, gates_K: torch.Tensor) -> torch.Tensor | None:
        """One token (a batch-1 decode step) through its K selected experts, (K, D), row k gated by gates_K[k];
        the fused kernel reads the token in place (nothing sorted or gathered). None where it does not apply
        (autograd, an adapter, another device or dtype): then :meth:`forward` on sorted rows."""
        if self.adapter is not None or not _fused_kernel_fits(x_1D, self.w1):
            return None
        return float_matmul.float_experts_one_token(x_1D, experts_K, gates_K, *local_weights(self.w1, self.w2, self.w3))

    def forward_loop(self, x_AD: torch.Tensor, counts_E: torch.Tensor,
                     gates_A: torch.Tensor | None = None) -> torch.Tensor:
        """The same as :meth:`forward`, one matmul per expert (dtypes or builds without grouped_mm)."""
        return self._swiglu(x_AD, counts_E, gates_A, loop_product)

    def _swiglu(self, x_AD: torch.Tensor, counts_E: torch.Tensor, gates_A: torch.Tensor | None,
                product: GroupedProduct) -> torch.Tensor:
        dtype = compute_dtype(x_AD)
        x_AD = x_AD.to(dtype)
        w1, w2, w3 = local_weights(self.w1, self.w2, self.w3)
        g_AF, u_AF = product(x_AD, w1, counts_E), product(x_AD, w3, counts_E)
        if self.adapter is not None:
            dg_AF, du_AF = self.adapter.gate_up(x_AD, counts_E, product)
            g_AF, u_AF = g_AF + dg_AF, u_AF + du_AF
        h_AF = F.silu(g_AF) * u_AF
        if gates_A is not None:
            h_AF = h_AF * gates_A.to(dtype).unsqueeze(1)
        y_AD = product(h_AF, w2, counts_E)
        if self.adapter is not None:
            y_AD = y_AD + self.adapter.down(h_AF, counts_E, product)
        return y_AD

    def product(self, x_AN: torch.Tensor, w_EMN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """(A, M): each expert's rows of x times its w[e] transposed, by the fastest path these operands fit:
        MKL's batched GEMM (fp32 on CPU, all experts in one call), else ``F.grouped_mm`` (fp32/bf16 operands
        whose row strides are multiples of 16 bytes), else one matmul per expert."""
        return grouped_product(x_AN, w_EMN, counts_E, mkl_batch=self.use_mkl_batch, grouped_mm=self.use_grouped_mm)


def grouped_product(x_AN: torch.Tensor, w_EMN: torch.Tensor, counts_E: torch.Tensor, *, mkl_batch: bool = True,
                    grouped_mm: bool = True) -> torch.Tensor:
    """:meth:`RoutedExperts.product` as a function (quantised experts run their adapters' terms through it)."""
    if widens(x_AN, w_EMN):  # a frozen bf16 base under fp32 activations: products in fp32 (nn/widen.py)
        return widened_grouped(x_AN, w_EMN, counts_E)
    if mkl_batch and mkl_grouped.fits(x_AN, w_EMN):
        return mkl_grouped.grouped_linear(x_AN, w_EMN, counts_E)
    w_EMN = compute_weight(w_EMN, x_AN.dtype)
    if grouped_mm and _grouped_mm_fits(x_AN.dtype, w_EMN.shape[1], w_EMN.shape[2]):
        return F.grouped_mm(x_AN, w_EMN.transpose(1, 2), offs=counts_E.cumsum(0).to(torch.int32))
    return loop_product(x_AN, w_EMN, counts_E)


class ExpertAdapter(Protocol):
    """Per-expert terms added inside :class:`RoutedExperts`' grouped products (LoRA: deepseek_moe/adapters/).
    ``product`` is the experts' own grouped product, so the terms run on the same fast path."""

    def gate_up(self, x_AD: torch.Tensor, counts_E: torch.Tensor,
                product: GroupedProduct) -> tuple[torch.Tensor, torch.Tensor]: ...

    def down(self, h_AF: torch.Tensor, counts_E: torch.Tensor, product: GroupedProduct) -> torch.Tensor: ...


# Assignments up to which fp32 experts take the fused kernel rather than MKL's batched GEMM (decode; bf16
# experts always do: torch's bf16 grouped products are the slow path on CPUs without AVX512-BF16).
FP32_FUSED_MAX_ROWS = 64


def _fused_kernel_fits(x_AD: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the fused float experts kernel is worth asking for (it still declines under autograd)."""
    few_rows = x_AD.shape[0] <= FP32_FUSED_MAX_ROWS  # bf16 beyond only where torch's bf16 is not native (oneDNN)
    return (x_AD.device.type == "cpu" and x_AD.dtype == w.dtype and not hasattr(w, "to_local")
            and ((w.dtype == torch.bfloat16 and (few_rows or not float_matmul.torch_bf16_matmul_is_native()))
                 or (w.dtype == torch.float32 and few_rows)))


def _grouped_mm_fits(dtype: torch.dtype, rows: int, cols: int) -> bool:
    """grouped_mm takes fp32/bf16 operands whose row strides are multiples of 16 bytes."""
    if dtype not in (torch.float32, torch.bfloat16) or not _grouped_mm_available():
        return False
    return (rows * dtype.itemsize) % 16 == 0 and (cols * dtype.itemsize) % 16 == 0


def loop_product(x_AN: torch.Tensor, w_EMN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """:meth:`RoutedExperts.product` one matmul per expert. unbind() rather than ``w[e]`` in the loop: indexing
    makes the backward zero-fill the whole stacked gradient once per expert."""
    w_EMN = compute_weight(w_EMN, x_AN.dtype)
    return torch.cat([x_eN @ w_MN.t() for x_eN, w_MN in zip(x_AN.split(counts_E.tolist()), w_EMN.unbind(0),
                                                            strict=True)])
