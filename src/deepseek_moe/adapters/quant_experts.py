"""Per-expert LoRA on frozen quantised routed experts, keeping for the backward only what it cannot recompute
cheaply: the compact twin of :meth:`QuantRoutedExperts._swiglu` (the reference, what autograd keeps).

Why: autograd through the plain SwiGLU keeps, per MoE layer, the gathered rows x (A, D) and four to five
(A, F) activations (the gate and up pre-activations, silu(g), h, the gated h) besides the adapters' own inputs:
~170 MB a V2-Lite layer at 512 tokens (A = 3,072 rows), measured, 4.4 GB over its 26 MoE layers, the memory that keeps its
LoRA run over 22 GB. This function keeps the layer's input x (T, D), which the router and the shared experts keep
anyway, instead of its gathered copy, the pre-activations g and u (the sums of the frozen product and the low-rank
term) and the gates: ~35 MB. The backward recomputes silu(g) * u * gate and the rank-r terms (a few
hundredths of the frozen products' FLOPs) and never the frozen int8/int4 products; x's gradient through the
frozen weights comes from their codes (quant/grad.py's kernels), the adapters' gradients from autograd over the
recomputed low-rank terms.

Shapes (moe/'s legend): A rows sorted by expert, D model dim, F expert hidden, E experts, r rank.
Tested against the plain path (tests/unit/test_quant_lora.py): values, x's, the gates' and every adapter
gradient, with experts that get no rows and an expert that gets every row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from deepseek_moe.kernels.quant_transposed import input_grad_grouped
from deepseek_moe.moe.experts import grouped_product
from deepseek_moe.quant.grad import frozen_quant_grouped

if TYPE_CHECKING:
    from deepseek_moe.quant.modules import QuantRoutedExperts


def _gate_up_terms(x_AD: torch.Tensor, A_ErD: torch.Tensor, B_E2Fr: torch.Tensor, counts_E: torch.Tensor,
                   scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """((A, F), (A, F)): scaling * B_e A_e x for each row's expert e, the gate's rows of B and the up's. Two
    (A, F) products, not one (A, 2F) split: at V2-Lite's 3,072 rows that is 35 MB, over glibc's 32 MB ceiling
    for reusing heap blocks, so a fresh mapping page-faulted in twice a layer each step."""
    t_Ar = grouped_product(x_AD, A_ErD.to(x_AD.dtype), counts_E)
    B_E2Fr = B_E2Fr.to(x_AD.dtype)
    F_ = B_E2Fr.shape[1] // 2
    return (grouped_product(t_Ar, B_E2Fr[:, :F_].contiguous(), counts_E) * scaling,
            grouped_product(t_Ar, B_E2Fr[:, F_:].contiguous(), counts_E) * scaling)


def _activation(g_AF: torch.Tensor, u_AF: torch.Tensor, gates_A: torch.Tensor | None) -> torch.Tensor:
    h_AF = F.silu(g_AF) * u_AF
    return h_AF if gates_A is None else h_AF * gates_A.to(h_AF.dtype).unsqueeze(1)


class _CompactLoRASwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rows_A: torch.Tensor | None, gates_A: torch.Tensor | None,
                gate_up_A: torch.Tensor, gate_up_B: torch.Tensor, down_A: torch.Tensor, down_B: torch.Tensor,
                experts: QuantRoutedExperts, counts_E: torch.Tensor, scaling: float, down_scaling: float,
                saved_dtype: torch.dtype | None) -> torch.Tensor:
        counts = counts_E.tolist()
        x_AD = x if rows_A is None else x.index_select(0, rows_A)
        dg_AF, du_AF = _gate_up_terms(x_AD, gate_up_A, gate_up_B, counts_E, scaling)
        g_AF = frozen_quant_grouped(x_AD, experts.w1, experts.w1_scale, counts).add_(dg_AF)
        u_AF = frozen_quant_grouped(x_AD, experts.w3, experts.w3_scale, counts).add_(du_AF)
        del dg_AF, du_AF
        h_AF = _activation(g_AF, u_AF, gates_A)
        y_AD = frozen_quant_grouped(h_AF, experts.w2, experts.w2_scale, counts)
        t_Ar = grouped_product(h_AF, down_A.to(h_AF.dtype), counts_E)
        y_AD += grouped_product(t_Ar, down_B.to(h_AF.dtype), counts_E) * down_scaling
        # x itself (kept by the layer's other users anyway), not its gathered copy: gathered again below.
        if saved_dtype is not None:  # opt-in: the pre-activations kept narrower (the output above is unaffected)
            g_AF, u_AF = g_AF.to(saved_dtype), u_AF.to(saved_dtype)
        ctx.save_for_backward(x, rows_A, g_AF, u_AF, gates_A, gate_up_A, gate_up_B, down_A, down_B, counts_E)
        ctx.experts, ctx.counts, ctx.scaling, ctx.down_scaling = experts, counts, scaling, down_scaling
        return y_AD

    @staticmethod
    def backward(ctx: Any, dy_AD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, rows_A, g_AF, u_AF, gates_A, gate_up_A, gate_up_B, down_A, down_B, counts_E = ctx.saved_tensors
        experts, counts = ctx.experts, ctx.counts
        # Indexed as forward's tensor arguments, rows_A dropped: x, gates, gate_up A and B, down A and B.
        wants = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:7])
        with torch.enable_grad():
            # The activation and the down projection's low-rank term, recomputed from leaves of their own.
            g = g_AF.detach().to(x.dtype).requires_grad_(True)
            u = u_AF.detach().to(x.dtype).requires_grad_(True)
            gates = None if gates_A is None else gates_A.detach().requires_grad_(wants[1])
            dA, dB = down_A.detach().requires_grad_(wants[4]), down_B.detach().requires_grad_(wants[5])
            h_AF = _activation(g, u, gates)
            h_leaf = h_AF.detach().requires_grad_(True)
            low_AD = grouped_product(grouped_product(h_leaf, dA.to(h_leaf.dtype), counts_E),
                                     dB.to(h_leaf.dtype), counts_E) * ctx.down_scaling
            down_in = [h_leaf] + [p for p in (dA, dB) if p.requires_grad]
            dh_AF, *d_down = torch.autograd.grad(low_AD, down_in, dy_AD)
            dh_AF = dh_AF + input_grad_grouped(dy_AD.contiguous(), experts.w2, experts.w2_scale, counts)
            act_in = [g, u] + ([gates] if gates is not None and gates.requires_grad else [])
            dg_AF, du_AF, *d_gates = torch.autograd.grad(h_AF, act_in, dh_AF)
            del h_AF, h_leaf, low_AD, dh_AF
            # x's gradient through the frozen gate and up weights, then the gate_up pair's low-rank term.
            dx_AD = None
            if wants[0]:
                dx_AD = input_grad_grouped(dg_AF, experts.w1, experts.w1_scale, counts)
                dx_AD += input_grad_grouped(du_AF, experts.w3, experts.w3_scale, counts)
            x_AD = (x if rows_A is None else x.index_select(0, rows_A)).detach().requires_grad_(wants[0])
            gA, gB = gate_up_A.detach().requires_grad_(wants[2]), gate_up_B.detach().requires_grad_(wants[3])
            up_in = [t for t in (x_AD, gA, gB) if t.requires_grad]
            d_up: list[torch.Tensor | None] = []
            if up_in:
                d_up = list(torch.autograd.grad(_gate_up_terms(x_AD, gA, gB, counts_E, ctx.scaling), up_in,
                                                (dg_AF, du_AF)))
        grads = iter(d_up)
        dx_low = next(grads) if wants[0] else None
        if dx_AD is not None and dx_low is not None:
            dx_AD += dx_low
        d_gA = next(grads) if wants[2] else None
        d_gB = next(grads) if wants[3] else None
        d_down_iter = iter(d_down)
        d_dA = next(d_down_iter) if wants[4] else None
        d_dB = next(d_down_iter) if wants[5] else None
        d_g = d_gates[0] if d_gates else None
        if dx_AD is not None and rows_A is not None:  # the gather's backward: each row's gradient to its token
            dx_AD = torch.zeros_like(x).index_add_(0, rows_A, dx_AD)
        return dx_AD, None, d_g, d_gA, d_gB, d_dA, d_dB, None, None, None, None, None


def compact_lora_swiglu(experts: QuantRoutedExperts, x: torch.Tensor, counts_E: torch.Tensor,
                        gates_A: torch.Tensor | None, gate_up: tuple[torch.Tensor, torch.Tensor],
                        down: tuple[torch.Tensor, torch.Tensor], scaling: float, down_scaling: float, *,
                        rows_A: torch.Tensor | None = None, saved_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(A, D): the routed experts' gated SwiGLU with per-expert LoRA pairs ``gate_up`` (A (E, r, D), B (E, 2F, r))
    and ``down`` (A (E, r, F), B (E, D, r)) (:class:`~deepseek_moe.adapters.lora.ExpertLoRA`'s), differentiable in
    x, the gates and the pairs (never the codes); the plain path's values, less memory kept for the backward.
    x: the (A, D) rows sorted by expert, or with ``rows_A`` (T, D) tokens whose rows ``x[rows_A]`` they are.
    ``saved_dtype`` (e.g. bf16; None: x's): what the pre-activations are kept in for the backward, which then
    computes the gradients from them rounded (the forward's values are not)."""
    return _CompactLoRASwiGLU.apply(x, rows_A, gates_A, *gate_up, *down, experts, counts_E, scaling, down_scaling,
                                    saved_dtype)
