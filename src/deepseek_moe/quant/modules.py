"""Quantised twins of nn.Linear and RoutedExperts: same forward signatures, int8 / int4 codes as buffers.

Both hold codes in the layout the CPU kernel reads (int4: ``pack.repack_int4_for_kernel``) and scales in the
dtype the format fixes (int8: float32 per row; int4: float16 per group). ``model.to(torch.bfloat16)`` changes
what these modules compute in, never their codes or scales (``deepseek_moe._torch_compat.KeepsDtypeOnCast``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe._torch_compat import KeepsDtypeOnCast
from deepseek_moe.kernels.block_one_token import FFNOperands
from deepseek_moe.kernels.moe_one_token import OneTokenLayer, moe_one_token
from deepseek_moe.kernels.quant_matmul import dequantize, quant_experts, quant_experts_one_token, quant_matmul
from deepseek_moe.kernels.quant_transposed import input_grad
from deepseek_moe.moe.experts import ExpertAdapter, FeedForward, RoutedExperts, grouped_product
from deepseek_moe.moe.router import Router
from deepseek_moe.quant import pack
from deepseek_moe.quant.grad import frozen_quant_grouped, frozen_quant_matmul, needs_grad


def effective_bits(bits: int, in_features: int, group_size: int) -> int:
    """int4 needs the input width to be a multiple of the group; otherwise int8 per channel (the fallback)."""
    return 4 if bits == 4 and in_features % group_size == 0 else 8


def empty_codes(rows: tuple[int, ...], in_features: int, bits: int, group_size: int,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (codes, scale) for ``rows`` (e.g. (N,) or (E, N)) rows of ``in_features`` inputs."""
    if bits == 8:
        return (torch.empty(*rows, in_features, dtype=torch.int8, device=device),
                torch.empty(*rows, dtype=pack.INT8_SCALE_DTYPE, device=device))
    return (torch.empty(*rows, in_features // 2, dtype=torch.uint8, device=device),
            torch.empty(*rows, in_features // group_size, dtype=pack.INT4_SCALE_DTYPE, device=device))


def quantize_rows(w_NK: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float rows -> (codes in the kernel layout, scale)."""
    if bits == 8:
        return pack.quantize_int8(w_NK)
    packed, scale = pack.quantize_int4(w_NK, group_size)
    return pack.repack_int4_for_kernel(packed, group_size), scale


def _hooked(module: nn.Module) -> bool:
    """Whether forward hooks are registered on ``module`` (a fused call would skip them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _fusable_ffn(ffn: nn.Module | None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int] | None:
    """(codes and scales of each product, group size) of a FeedForward whose three products are QuantLinear in
    one format, with no bias and no hook (the MoE call takes them as one expert); None for anything else."""
    return ffn.quantised_codes() if type(ffn) is FeedForward else None


class _KeepsScales(KeepsDtypeOnCast):
    """``.to(dtype)`` / ``.half()`` must not cast scales: they are part of the format. The module records the
    floating dtype it was asked for as ``dtype`` (what a dequantised matrix is returned in)."""

    def kept_dtype_buffers(self) -> list[str]:
        return [n for n, _ in self.named_buffers(recurse=False) if n.endswith("_scale")]


class QuantLinear(_KeepsScales):
    """y = x W^T (+ b) with W stored as int8 per output row or int4 per input group.

    Buffers: ``qweight`` codes (int8 (N, K) or uint8 (N, K/2)), ``weight_scale``; ``bias`` (N,) optional,
    unquantised. ``weight`` is the dequantised (N, K) matrix, built on each access (MLA's absorbed attention
    reads wkv_b that way when it is quantised).
    """

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits = effective_bits(bits, in_features, group_size)
        self.group_size = group_size
        self.dtype = dtype
        codes, scale = empty_codes((out_features,), in_features, self.bits, group_size, device)
        self.qweight: torch.Tensor
        self.weight_scale: torch.Tensor
        self.register_buffer("qweight", codes)
        self.register_buffer("weight_scale", scale)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, bits: int, group_size: int) -> QuantLinear:
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, bits=bits, group_size=group_size,
                bias=linear.bias is not None, dtype=w.dtype, device=w.device)
        q.load_float_rows(w)
        if linear.bias is not None and q.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def load_float_rows(self, w_NK: torch.Tensor, first_row: int = 0) -> None:
        """Quantise float rows into rows [first_row, first_row + n) (callers stream big matrices in chunks)."""
        codes, scale = quantize_rows(w_NK, self.bits, self.group_size)
        self.qweight[first_row:first_row + codes.shape[0]] = codes
        self.weight_scale[first_row:first_row + codes.shape[0]] = scale

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.weight_scale, self.dtype)

    def matrix(self) -> torch.Tensor:
        """The (out, in) matrix this layer applies (``Linear.matrix``'s twin: MLA's absorbed attention)."""
        return self.weight

    def plain_codes(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(codes, scales) where this layer is exactly x @ dequant(codes)^T: no bias, no hook, not a subclass (a
        LoRA pair adds its own term); None otherwise. The fused calls read them: MLA's one-call decode, the MoE
        call's shared experts and a dense block's FFN (FeedForward.quantised_codes)."""
        if type(self) is not QuantLinear or self.bias is not None or _hooked(self):
            return None
        return self.qweight, self.weight_scale

    def input_grad_rows(self, dy_Mn: torch.Tensor, rows: slice) -> torch.Tensor:
        """dy (M, n) @ W[rows] (n, K) from the codes: the fused loss's gradient through a quantised head
        (nn/cross_entropy.py), a slice of the vocabulary at a time."""
        return input_grad(dy_Mn, self.qweight[rows], self.weight_scale[rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # With autograd (LoRA on a quantised base), x's gradient is computed from the codes in the backward
        # (quant/grad.py) instead of autograd keeping a dequantised copy of W.
        matmul = frozen_quant_matmul if needs_grad(x) else quant_matmul
        y = matmul(x, self.qweight, self.weight_scale)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        how = "int8 per channel" if self.bits == 8 else f"int4 groups of {self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {how}"


class QuantRoutedExperts(_KeepsScales):
    """E SwiGLU experts with quantised w1 (E, F, D), w2 (E, D, F), w3 (E, F, D), the buffers named as
    RoutedExperts' parameters (``w1`` codes, ``w1_scale`` ...), and its forward signature.

    Only experts that received rows run. Each runs as ``quant_matmul`` on its contiguous slice of rows: the
    streaming kernel for the few rows of decode, dequantised tiles + GEMM for the many rows of prefill.
    w1/w3 (input D) and w2 (input F) fall back to int8 independently when their input is not a multiple of
    the group.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, *, bits: int, group_size: int, offset: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.n_experts, self.offset = n_experts, offset
        self.dim, self.inter_dim, self.group_size = dim, inter_dim, group_size
        self.dtype = dtype
        self.bits_w13 = effective_bits(bits, dim, group_size)
        self.bits_w2 = effective_bits(bits, inter_dim, group_size)
        for name, (rows, width, b) in {"w1": (inter_dim, dim, self.bits_w13), "w2": (dim, inter_dim, self.bits_w2),
                                       "w3": (inter_dim, dim, self.bits_w13)}.items():
            codes, scale = empty_codes((n_experts, rows), width, b, group_size, device)
            self.register_buffer(name, codes)
            self.register_buffer(f"{name}_scale", scale)
        self.w1: torch.Tensor
        self.w2: torch.Tensor
        self.w3: torch.Tensor
        self.w1_scale: torch.Tensor
        self.w2_scale: torch.Tensor
        self.w3_scale: torch.Tensor
        self.adapter: ExpertAdapter | None = None  # per-expert LoRA (adapters/), as RoutedExperts.adapter

    def bits_of(self, name: str) -> int:
        return self.bits_w2 if name == "w2" else self.bits_w13

    @classmethod
    def from_experts(cls, experts: RoutedExperts, *, bits: int, group_size: int) -> QuantRoutedExperts:
        w1 = experts.w1.detach()
        E, F_, D = w1.shape
        q = cls(E, D, F_, bits=bits, group_size=group_size, offset=experts.offset,
                dtype=w1.dtype, device=w1.device)
        for name in ("w1", "w2", "w3"):
            w = getattr(experts, name).detach()
            for e in range(E):
                q.load_float_expert(name, e, w[e])
        return q

    def load_float_expert(self, name: str, e: int, w: torch.Tensor, first_row: int = 0) -> None:
        codes, scale = quantize_rows(w, self.bits_of(name), self.group_size)
        getattr(self, name)[e, first_row:first_row + codes.shape[0]] = codes
        getattr(self, f"{name}_scale")[e, first_row:first_row + codes.shape[0]] = scale

    def reset_parameters(self) -> None:
        """Nothing to draw: quantised weights only ever come from a trained model or a checkpoint."""

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor, gates_A: torch.Tensor | None = None, *,
                rows_A: torch.Tensor | None = None) -> torch.Tensor:
        """x_AD rows sorted by expert, ``counts_E[e]`` of them for expert e (with ``rows_A``: x is (T, D) and the
        rows are ``x[rows_A]``, as RoutedExperts.forward); gates_A scales the (A, F) activation."""
        compact = getattr(self.adapter, "quantised_swiglu", None)
        if compact is not None and rows_A is not None:
            # An adapter that keeps less for the backward (adapters/quant_experts.py), x itself not its gathered copy
            y_AD = compact(self, x_AD, counts_E, gates_A, rows_A=rows_A)
            if y_AD is not None:
                return y_AD
        if rows_A is not None:
            x_AD = x_AD.index_select(0, rows_A)
        if self.adapter is not None or needs_grad(x_AD) or (gates_A is not None and needs_grad(gates_A)):
            return self._swiglu(x_AD, counts_E, gates_A)
        weights = {n: (getattr(self, n), getattr(self, f"{n}_scale")) for n in ("w1", "w2", "w3")}
        fused = quant_experts(x_AD, counts_E, gates_A, weights, self.group_size)
        if fused is not None:
            return fused
        y_AD = x_AD.new_empty(x_AD.shape[0], self.dim)
        start = 0
        for e, n in enumerate(counts_E.tolist()):
            if n == 0:
                continue
            rows = slice(start, start + n)
            x_nD = x_AD[rows]
            h_nF = F.silu(quant_matmul(x_nD, self.w1[e], self.w1_scale[e]))
            h_nF = h_nF * quant_matmul(x_nD, self.w3[e], self.w3_scale[e])
            if gates_A is not None:
                h_nF = h_nF * gates_A[rows].unsqueeze(1)
            y_AD[rows] = quant_matmul(h_nF, self.w2[e], self.w2_scale[e])
            start += n  # experts with no rows are skipped above: only the selected experts run
        return y_AD

    def one_token(self, x_1D: torch.Tensor, experts_K: torch.Tensor, gates_K: torch.Tensor) -> torch.Tensor | None:
        """As RoutedExperts.one_token: one token (1, D) through its K selected experts, (K, D), row k gated by
        gates_K[k], in one kernel call; None where that does not apply (an adapter, autograd, no kernel): then
        :meth:`forward` on sorted rows."""
        if self.adapter is not None or needs_grad(x_1D) or needs_grad(gates_K):
            return None
        weights = {n: (getattr(self, n), getattr(self, f"{n}_scale")) for n in ("w1", "w2", "w3")}
        return quant_experts_one_token(x_1D, experts_K, gates_K, weights, self.group_size)

    def layer_one_token(self, x_1D: torch.Tensor, router: nn.Module, shared: nn.Module | None) -> OneTokenLayer | None:
        """The whole MoE layer for a few fp32 tokens (T, D), T <= 16, these experts with ``router`` (the layer's
        Router) and ``shared`` (its shared experts, or None), in one kernel call (kernels/moe_one_token.py). Shared
        experts kept in float (QuantConfig.keep), or quantised with a bias or a hook, run as their own module after
        the call. None where the call does not apply: an adapter or a hook on the experts or router, autograd, not
        fp32, a router that is not ours, expert parallelism (an offset); then the layer runs as before."""
        if (self.adapter is not None or self.offset or x_1D.dtype != torch.float32 or needs_grad(x_1D)
                or type(router) is not Router or _hooked(self) or _hooked(router)
                or (torch.is_grad_enabled() and router.weight.requires_grad)):  # the router's gradient: the Router's
            return None
        fused = _fusable_ffn(shared)
        weights = {n: (getattr(self, n), getattr(self, f"{n}_scale")) for n in ("w1", "w2", "w3")}
        layer = moe_one_token(x_1D, router.weight, router.e_score_correction_bias, router.cfg, weights,
                              self.group_size, *(fused or (None, 0)))
        if layer is not None and shared is not None and fused is None:
            return layer._replace(y_1D=layer.y_1D + shared(x_1D))
        return layer

    def one_call_operands(self, router: nn.Module, shared: nn.Module | None) -> FFNOperands | None:
        """The MoE layer of these experts, ``router`` and ``shared`` as a whole block's call takes it
        (kernels/block_one_token.py), under the conditions of :meth:`layer_one_token` (the tokens' own aside) and
        with shared experts that fuse; None otherwise."""
        if (self.adapter is not None or self.offset or type(router) is not Router or _hooked(self) or _hooked(router)
                or torch.is_grad_enabled()):
            return None
        fused = _fusable_ffn(shared)
        if shared is not None and fused is None:
            return None
        weights = {n: (getattr(self, n), getattr(self, f"{n}_scale")) for n in ("w1", "w2", "w3")}
        return FFNOperands(router.weight, router.e_score_correction_bias, router.cfg, weights, self.group_size,
                           *(fused or (None, 0)))

    def _swiglu(self, x_AD: torch.Tensor, counts_E: torch.Tensor, gates_A: torch.Tensor | None) -> torch.Tensor:
        """RoutedExperts' SwiGLU with the adapter's terms beside each frozen quantised grouped product, and
        gradients to x, the gates and the adapter (never to the codes): LoRA training on a quantised base."""
        # An adapter that keeps less for the backward (adapters/quant_experts.py) takes the whole product.
        compact = getattr(self.adapter, "quantised_swiglu", None)
        y_AD = compact(self, x_AD, counts_E, gates_A) if compact is not None else None
        if y_AD is not None:
            return y_AD
        counts = counts_E.tolist()
        g_AF = frozen_quant_grouped(x_AD, self.w1, self.w1_scale, counts)
        u_AF = frozen_quant_grouped(x_AD, self.w3, self.w3_scale, counts)
        if self.adapter is not None:
            dg_AF, du_AF = self.adapter.gate_up(x_AD, counts_E, grouped_product)
            g_AF, u_AF = g_AF + dg_AF, u_AF + du_AF
        h_AF = F.silu(g_AF) * u_AF
        if gates_A is not None:
            h_AF = h_AF * gates_A.to(h_AF.dtype).unsqueeze(1)
        y_AD = frozen_quant_grouped(h_AF, self.w2, self.w2_scale, counts)
        if self.adapter is not None:
            y_AD = y_AD + self.adapter.down(h_AF, counts_E, grouped_product)
        return y_AD

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, dim={self.dim}, inter_dim={self.inter_dim}, "
                f"bits w1/w3={self.bits_w13}, w2={self.bits_w2}, group_size={self.group_size}")
