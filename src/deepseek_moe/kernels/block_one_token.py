"""A whole decoder block with quantised weights for a few new tokens (a decode step, a speculative verification)
in one C++ call (qgemm.cpp ``dsm_block_one_token``).

After the MLA and MoE layers each became one call (kernels/mla_one_token.py, kernels/moe_one_token.py), what was
left of a block at decode was Python: two norms, the router's product, two residual adds, the module calls and the
two calls' own checks, ~0.45 ms a block of the mid-size int8 model beside ~1.05 ms of kernels. This call runs the
block's steps back to back: attention norm, the MLA call, the residual, the FFN norm, the router's logits, the MoE
call (or a dense FFN as one expert), the residual. The logits are summed in C++, in double, row by row (a
verification's tokens get the logits each would get in a decode step): equal to the Router's fp32 product to
rounding, so at a near-tie within rounding the block's call may rank the other expert first, as any other order
of summation would; an exact tie at the cut is left to the Router.

The readable reference is the block's own path, module by module (``Block._ffn(Block._attention(...))``), and under
``reference_paths()`` plain PyTorch; the tests compare against both.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from deepseek_moe.kernels import cpu_build
from deepseek_moe.kernels.mla_one_token import Codes, entry_points, projection_descriptors, step_tensors
from deepseek_moe.kernels.moe_one_token import MAX_TOKENS, SelectionRule, Weights, layer_arguments
from deepseek_moe.kernels.quant_matmul import _kernel_for


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
    y: torch.Tensor  # (B, T, D): the block's output, or where tied, x + attention (the FFN half still to run)
    tied: bool  # an exact tie at the router's cut: the caller runs the FFN norm and the MoE layer on y and adds
    tokens_per_expert: torch.Tensor | None  # (E,) int64 for a MoE layer served, else None
    n_assignments: int


class BlockCall:
    """A block's one call: ``build`` checks and packs the arguments of ``dsm_block_one_token`` that do not change
    from step to step (the weights' addresses and formats, the sizes, the selection rule) once; a step then checks
    and passes only its own tensors (x (B, T, D) fp32, B * T <= MAX_TOKENS, the rotary tables, the cache views
    whose last T slots the call writes, the mask). Valid while the weights it was built from are
    (model/call_plan.py tells)."""

    def __init__(self, D: int, mla: MLAOperands, front: tuple[object, ...], mla_static: tuple[object, ...],
                 mla_tail: tuple[object, ...], ffn_static: tuple[object, ...], E: int, K: int,
                 keep: tuple[object, ...]) -> None:
        self.D, self.mla, self.E, self.K = D, mla, E, K
        self.routed = ffn_static[2] is not None  # a router's weight: a MoE layer, not a dense FFN
        self._front, self._mla_static, self._mla_tail, self._ffn_static = front, mla_static, mla_tail, ffn_static
        self._keep = keep  # the tensors the addresses point into

    @classmethod
    def build(cls, D: int, attn_norm: tuple[torch.Tensor, float], mla: MLAOperands,
              ffn_norm: tuple[torch.Tensor, float], ffn: FFNOperands) -> BlockCall | None:
        """None where the call does not serve these weights; ValueError (naming them) where they do not fit."""
        norms = (attn_norm[0], ffn_norm[0], *([] if ffn.router_weight is None else [ffn.router_weight]))
        if any(w.dtype != torch.float32 or not w.is_cpu or not w.is_contiguous() or w.shape[-1] != D for w in norms):
            return None
        mla_lib = cpu_build.load_mla_decode_library()
        desc_t = projection_descriptors(D, mla.projections, mla.q_norm, mla.kv_norm, mla.heads, mla.w_uk, mla.w_uv_t)
        if mla_lib is None or desc_t is None:
            return None
        layer = layer_arguments(D, ffn.router_weight, ffn.bias_E, ffn.rule, ffn.experts, ffn.group_size, ffn.shared,
                                 ffn.shared_group_size)
        if layer is None:
            return None
        E, K, selection, weights = layer
        H, N, R, C, V = mla.heads
        q_norm, kv_norm = mla.q_norm, mla.kv_norm
        mla_static = (desc_t.data_ptr(), None if q_norm is None else q_norm[0].data_ptr(),
                      0.0 if q_norm is None else q_norm[1], H, N, R, C, V, kv_norm[0].data_ptr(), kv_norm[1])
        router = ffn.router_weight
        ffn_static = (ffn_norm[0].data_ptr(), ffn_norm[1], None if router is None else router.data_ptr(), *selection,
                      *weights)
        front = (attn_norm[0].data_ptr(), attn_norm[1])
        tail = (mla.w_uk.data_ptr(), mla.w_uv_t.data_ptr(), mla.scale, *entry_points(mla_lib))
        return cls(D, mla, front, mla_static, tail, ffn_static, E, K, (desc_t, attn_norm, ffn_norm, mla, ffn))

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_all: torch.Tensor,
                 pe_all: torch.Tensor, mask: torch.Tensor | None) -> BlockStep | None:
        """The block over x (B, T, D) with this step's rotary tables, cache views (their last T slots written by
        the call) and mask, as mla_one_token takes them; None where the step does not take the call (nothing
        written): the caller runs the block's modules."""
        B, T, D = x.shape
        lib = _kernel_for(x)
        if lib is None or not 0 < B * T <= MAX_TOKENS or D != self.D:
            return None
        step = step_tensors(x, cos, sin, kv_all, pe_all, mask, self.mla.heads, "block_one_token")
        if step is None:
            return None
        x, cos, sin, mask_bytes = step
        S = kv_all.shape[1]
        y, counts = torch.empty(B, T, D), torch.empty(self.E, dtype=torch.int64)
        tied = lib.dsm_block_one_token(
            x.data_ptr(), B, T, D, *self._front, *self._mla_static, cos.data_ptr(), sin.data_ptr(),
            int(self.mla.interleave), kv_all.data_ptr(), kv_all.stride(0), kv_all.stride(1), pe_all.data_ptr(),
            pe_all.stride(0), pe_all.stride(1), S - T, None if mask_bytes is None else mask_bytes.data_ptr(),
            *self._mla_tail, *self._ffn_static, counts.data_ptr(), y.data_ptr(), torch.get_num_threads())
        return BlockStep(y, bool(tied), counts if self.routed and not tied else None, B * T * self.K)


__all__ = ["BlockCall", "BlockStep", "FFNOperands", "MLAOperands"]
