"""A whole decoder block with quantised weights for a few new tokens (a decode step, a speculative verification)
in one C++ call (qgemm.cpp ``dsm_block_one_token``).

After the MLA and MoE layers each became one call (kernels/mla_one_token.py, kernels/moe_one_token.py), what was
left of a block at decode was Python: two norms, the router's product, two residual adds, the module calls and the
two calls' own checks, ~0.45 ms a block of the mid-size int8 model beside ~1.05 ms of kernels. This call runs the
block's steps back to back: attention norm, the MLA call, the residual, the FFN norm, the router's logits (summed
per row in C++), the MoE call (or a dense FFN as one expert), the residual.

The readable reference is the block's own path, module by module (``Block._ffn(Block._attention(...))``), and under
``reference_paths()`` plain PyTorch; the tests compare against both.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from deepseek_moe.kernels.mla_one_token import Codes, mla_call
from deepseek_moe.kernels.moe_one_token import MAX_TOKENS, SelectionRule, Weights, _layer_arguments


class MLAOperands(NamedTuple):
    """An MLA layer as ``mla_one_token`` takes it (its arguments of the same names)."""

    projections: dict[str, Codes | None]
    q_norm: tuple[torch.Tensor, float] | None
    kv_norm: tuple[torch.Tensor, float]
    interleave: bool
    heads: tuple[int, int, int, int, int]
    w_uk: torch.Tensor
    w_uv_t: torch.Tensor
    scale: float


class FFNOperands(NamedTuple):
    """A MoE layer as ``moe_one_token`` takes it (its arguments of the same names), or a dense FFN: ``shared`` alone,
    the router, rule and experts None."""

    router_weight: torch.Tensor | None
    bias_E: torch.Tensor | None
    rule: SelectionRule | None
    experts: Weights | None
    group_size: int
    shared: Weights | None
    shared_group_size: int


class BlockStep(NamedTuple):
    y: torch.Tensor  # (B, T, D): the block's output, or where tied, x + attention (the MoE layer still to add)
    tied: bool  # an exact tie at the router's cut: the caller runs the MoE layer on ``normed`` and adds it to y
    normed: torch.Tensor  # (B, T, D): RMSNorm(x + attention) * ffn_norm, the FFN's input
    tokens_per_expert: torch.Tensor | None  # (E,) int64 for a MoE layer served, else None
    n_assignments: int


def block_one_token(x: torch.Tensor, attn_norm: tuple[torch.Tensor, float], mla: MLAOperands,
                    ffn_norm: tuple[torch.Tensor, float], ffn: FFNOperands, cos: torch.Tensor, sin: torch.Tensor,
                    kv_all: torch.Tensor, pe_all: torch.Tensor, mask: torch.Tensor | None) -> BlockStep | None:
    """x (B, T, D) fp32, B * T <= MAX_TOKENS, through a block: ``attn_norm`` / ``ffn_norm`` (weight, eps), the MLA
    layer ``mla`` over the cache views ``kv_all`` / ``pe_all`` (their last T slots written by the call, as
    mla_one_token's), cos/sin and mask as there, then ``ffn``. None where the call does not apply (nothing
    written): the caller runs the block's modules."""
    B, T, D = x.shape
    if not 0 < B * T <= MAX_TOKENS:
        return None
    norms = (attn_norm[0], ffn_norm[0], *([] if ffn.router_weight is None else [ffn.router_weight]))
    if any(w.dtype != torch.float32 or not w.is_cpu or not w.is_contiguous() or w.shape[-1] != D for w in norms):
        return None
    call = mla_call(x, mla.projections, mla.q_norm, mla.kv_norm, cos, sin, mla.interleave, mla.heads, kv_all, pe_all,
                    mask, mla.w_uk, mla.w_uv_t, mla.scale)
    if call is None:
        return None
    layer = _layer_arguments(D, ffn.router_weight, ffn.bias_E, ffn.rule, ffn.experts, ffn.group_size, ffn.shared,
                             ffn.shared_group_size)
    if layer is None:
        return None
    lib, mla_args, _keep = call
    E, K, selection, weights = layer
    M = B * T
    x = x.contiguous()
    y, normed = torch.empty(B, T, D), torch.empty(B, T, D)
    idx, gates, counts = torch.empty(M, K, dtype=torch.int64), torch.empty(M, K), torch.empty(E, dtype=torch.int64)
    router = ffn.router_weight
    tied = lib.dsm_block_one_token(
        x.data_ptr(), B, T, D, attn_norm[0].data_ptr(), attn_norm[1], *mla_args, ffn_norm[0].data_ptr(), ffn_norm[1],
        None if router is None else router.data_ptr(), *selection, *weights, idx.data_ptr(), gates.data_ptr(),
        counts.data_ptr(), normed.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return BlockStep(y, bool(tied), normed, None if router is None or tied else counts, M * K)


__all__ = ["BlockStep", "FFNOperands", "MLAOperands", "block_one_token"]
