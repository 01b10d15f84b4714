"""Multi-head Latent Attention (DeepSeek-V2 §2.1).

Keys and values are compressed jointly into a latent c_kv (kv_lora_rank) per token; a separate shared key k_pe
(qk_rope_head_dim) carries RoPE, because RoPE'd keys cannot be reconstructed from a position-free latent.
Only c_kv and k_pe are cached: (kv_lora_rank + qk_rope_head_dim) elements per token per layer.

Three ways to compute the same attention:

* no cache (training, scoring): expand keys and values from the latent and use fused SDPA with a causal mask;
* cache, ``attn_impl="naive"``: append to the latent cache, re-expand every cached slot each step;
* cache, ``attn_impl="absorb"``: fold wkv_b's key half into the query and its value half into the output, so
  attention runs directly against the cached latent and nothing is expanded (DeepSeek-V3 inference code).

The absorbed path has a fused twin for inference (:meth:`MLA._absorbed_fused`, taken without autograd unless
``deepseek_moe.kernels.switch.reference_paths()`` is on): four batched products on the absorbed matrices kept
contiguous between steps, fp32 whatever the model's dtype (a bf16 bmm over the cache runs a generic loop on CPUs
without AVX512-BF16: 4 ms against 0.1 ms in fp32 at 1,024 slots), no mask where a single new token sees every slot;
for a few new tokens per row (decode, speculative verification) all of it is one C++ call
(``kernels/mla_decode.cpp``).

Shapes: B batch, T new tokens, S cached + new slots, H heads, C kv_lora_rank, R qk_rope_head_dim,
N qk_nope_head_dim, V v_head_dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe._torch_compat import tensor_version
from deepseek_moe.config import ModelConfig
from deepseek_moe.kernels.block_one_token import MLAOperands
from deepseek_moe.kernels.mla_decode import MAX_NEW_TOKENS, absorbed_decode, prepare
from deepseek_moe.kernels.mla_one_token import PROJECTIONS, mla_one_token
from deepseek_moe.kernels.switch import fast_paths_enabled
from deepseek_moe.model.kv_cache import LayerCache
from deepseek_moe.model.norm import RMSNorm
from deepseek_moe.model.rope import apply_rotary, softmax_scale
from deepseek_moe.nn.linear import Linear

# The latent norms use eps 1e-6 whatever the model's norm_eps: DeepSeek's and transformers' code hard-code it.
LATENT_NORM_EPS = 1e-6


def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool: the T new tokens are the last T of S slots; each sees itself and everything before."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


Out = TypeVar("Out")


def _in_new_slots(cache: LayerCache, T: int, like: tuple[torch.Tensor, ...],
                  write: Callable[[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]], Out | None]) -> Out | None:
    """``write(new slots, all slots)`` after the cache grew by T slots shaped like ``like`` (a kernel fills the new
    ones in place); the cache rolled back where it returns None (the kernel declined) or raises."""
    slots, cached = cache.grow(T, *like)
    try:
        out = write(slots, cached)
    except BaseException:
        cache.truncate(cache.length - T)
        raise
    if out is None:
        cache.truncate(cache.length - T)
    return out


class MLA(nn.Module):
    """Multi-head Latent Attention. Parameter names follow DeepSeek-V3's inference code (io/ maps them).

    With ``attention_bias`` wq_a, wkv_a and wo carry biases; wq, wq_b and wkv_b never do, which is also what lets
    the absorbed path fold wkv_b into the query and output as a plain matrix."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.attn_impl = cfg.attn_impl
        self.rope_interleave = cfg.rope_interleave
        self.softmax_scale = softmax_scale(cfg)

        if self.q_lora_rank == 0:
            self.wq = Linear(cfg.dim, cfg.n_heads * cfg.qk_head_dim, bias=False)
        else:
            self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = Linear(cfg.q_lora_rank, cfg.n_heads * cfg.qk_head_dim, bias=False)
        self.wkv_a = Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=cfg.attention_bias)
        # The fused path's fp32 (w_uk (H, N, C), w_uv^T (H, C, V)) and the (storage address, version) of the
        # wkv_b weight they were made from: rebuilt when the weight changes (a load, an optimizer step).
        self._absorbed_weights: tuple[tuple[int, int, torch.dtype], torch.Tensor, torch.Tensor] | None = None

    def train(self, mode: bool = True) -> MLA:
        # Writes that bump no version counter (torch's fused AdamW, ``.data`` copies) happen while training: every
        # switch between training and evaluation starts the fused path from the weight as it is.
        self._absorbed_weights = None
        return super().train(mode)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: LayerCache | None = None) -> torch.Tensor:
        """x (B, T, dim); cos/sin (B, T, R/2); mask (B, 1, T, S) bool (True: may attend) or None for plain
        causal attention without a cache. Returns (B, T, dim)."""
        B, T, _ = x.shape
        if cache is not None and self._one_call_applies(cache, x):
            out = self._one_call(x, cos, sin, mask, cache)
            if out is not None:
                return out
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, self.n_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        kv_raw = self.wkv_a(x)  # (B, T, C + R)
        if cache is not None and self._prepares_in_cpp(cache, kv_raw):
            out = self._prepared_decode(q_nope, q_pe, kv_raw, cos, sin, mask, cache)
            if out is not None:
                return out
        q_pe = apply_rotary(q_pe, cos, sin, self.rope_interleave)  # (B, T, H, R)

        kv, k_pe = kv_raw.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)  # (B, T, C)
        k_pe = apply_rotary(k_pe[:, :, None, :], cos, sin, self.rope_interleave)[:, :, 0]  # (B, T, R)

        if cache is not None:
            kv, k_pe = cache.append(kv, k_pe)  # (B, S, C), (B, S, R)
            if self.attn_impl == "absorb":
                if (fast_paths_enabled() and not torch.is_grad_enabled() and type(self.wkv_b) is Linear
                        and kv.device.type == "cpu"):  # on a GPU the plain path keeps the model's dtype
                    return self._absorbed_fused(q_nope, q_pe, kv, k_pe, mask)
                return self._absorbed(q_nope, q_pe, kv, k_pe, mask)
        return self._naive(q_nope, q_pe, kv, k_pe, mask)

    def _one_call_applies(self, cache: LayerCache, x: torch.Tensor) -> bool:
        """Whether a step of a few new tokens may run as one C++ call, projections included
        (kernels/mla_one_token.py): as :meth:`_prepares_in_cpp`, with norms that are plain RMSNorms."""
        return (self._prepares_in_cpp(cache, x) and all(
            type(n) is RMSNorm and not (n._forward_hooks or n._forward_pre_hooks)
            for n in (self.kv_norm, *([] if self.q_lora_rank == 0 else [self.q_norm]))))

    def _one_call(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                  cache: LayerCache) -> torch.Tensor | None:
        """:meth:`forward` as one C++ call where every projection is a plain quantised product (``plain_codes``:
        a QuantLinear without bias, hook or adapter); None, the cache as it was, otherwise."""
        ops = self.one_call_operands()
        if ops is None:
            return None
        T = x.shape[1]

        def write(slots: tuple[torch.Tensor, ...], cached: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
            kv, k_pe = cached  # the call writes the new slots itself
            return mla_one_token(x, ops.projections, ops.q_norm, ops.kv_norm, cos, sin, ops.interleave, ops.heads, kv,
                                 k_pe, mask, ops.w_uk, ops.w_uv_t, ops.scale)

        return self.in_new_slots(cache, T, x, write)

    def in_new_slots(self, cache: LayerCache, T: int, x: torch.Tensor,
                     write: Callable[[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]], Out | None]) -> Out | None:
        """``write(new slots, all slots)`` with the cache grown by this layer's T slots (latent and rotary key, of
        x's rows and dtype), rolled back where it returns None or raises: a C++ call that writes the new slots
        itself (this layer's, or a whole block's)."""
        if cache.dtype is not None:  # storage there: the shapes are its own
            return _in_new_slots(cache, T, (), write)
        column, B = x[..., :1], x.shape[0]
        return _in_new_slots(cache, T, (column.expand(B, T, self.kv_lora_rank),
                                        column.expand(B, T, self.qk_rope_head_dim)), write)

    def one_call_operands(self) -> MLAOperands | None:
        """This layer as the one-call decode takes it, where every projection is a plain quantised product
        (``plain_codes``: a QuantLinear without bias, hook or adapter); None otherwise. Ask :meth:`_one_call_applies`
        first (the cache, the norms, tracing)."""
        codes: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        for name in PROJECTIONS:
            module = self._modules.get(name)
            plain = getattr(module, "plain_codes", None)
            got = plain() if callable(plain) else None
            if module is not None and got is None:
                return None
            codes[name] = got
        w_uk, w_uv_t = self._absorbed_matrices(torch.float32)
        return MLAOperands(codes, None if self.q_lora_rank == 0 else (self.q_norm.weight, self.q_norm.eps),
                           (self.kv_norm.weight, self.kv_norm.eps), self.rope_interleave,
                           (self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank,
                            self.v_head_dim), w_uk, w_uv_t, self.softmax_scale)

    def _prepares_in_cpp(self, cache: LayerCache, kv_raw: torch.Tensor) -> bool:
        """Whether a step of a few new tokens takes the C++ path from the projections on: the latent norm, both
        rotations and the cache write in one call (kernels/mla_decode.py ``prepare``), then the absorbed attention's
        call. Our own cache type only (a paged one gathers its slots), fp32, no autograd, no hook on the norm."""
        # Tracing (an export) is asked first: a shape test before it would become a guard of the traced graph.
        return (fast_paths_enabled() and not torch.is_grad_enabled() and type(cache) is LayerCache
                and self.attn_impl == "absorb" and kv_raw.shape[1] <= MAX_NEW_TOKENS and kv_raw.dtype == torch.float32
                and cache.dtype in (None, torch.float32) and kv_raw.device.type == "cpu"
                and type(self.wkv_b) is Linear and type(self.kv_norm) is RMSNorm
                and not (self.kv_norm._forward_hooks or self.kv_norm._forward_pre_hooks))

    def _prepared_decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_raw: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, mask: torch.Tensor | None, cache: LayerCache) -> torch.Tensor | None:
        """:meth:`forward` from the projections on, with the norm, rotations and cache write as one C++ call (the
        cache's new slots are written in place); None, the cache as it was, where the kernel declines."""
        T, C = kv_raw.shape[1], self.kv_lora_rank

        def write(slots: tuple[torch.Tensor, ...], cached: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
            q_rot = prepare(q_pe, kv_raw, cos, sin, self.kv_norm.weight, self.kv_norm.eps, self.rope_interleave,
                            *slots)
            kv, k_pe = cached
            return None if q_rot is None else self._absorbed_fused(q_nope, q_rot, kv, k_pe, mask)

        return _in_new_slots(cache, T, (kv_raw[..., :C], kv_raw[..., C:]), write)

    def _naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        S = kv.shape[1]
        kv = self.wkv_b(kv).view(B, S, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, S, H, self.qk_rope_head_dim)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        if mask is None and S != T:
            mask = causal_mask(T, S, kv.device)
        # SDPA's fused CPU kernel wants v's head dim equal to q's; otherwise SDPA takes its math path, which
        # computes bf16 attention in fp32. Zero columns of v give zero columns of the output, sliced off again.
        pad = q.shape[-1] - self.v_head_dim if q.device.type == "cpu" else 0
        if pad > 0:
            v = F.pad(v, (0, pad))
        # SDPA wants (B, H, T, head_dim).
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale)
        return self.wo(out[..., :self.v_head_dim].transpose(1, 2).reshape(B, T, H * self.v_head_dim))

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        # matrix(): the weight with any unmerged adapter's update (a quantised wkv_b dequantises its weight)
        matrix = self.wkv_b.matrix().to(q_nope.dtype)  # a no-op but for a bf16-held base under fp32 activations
        wkv_b = matrix.view(H, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = wkv_b[:, : self.qk_nope_head_dim], wkv_b[:, self.qk_nope_head_dim :]  # (H, N, C), (H, V, C)
        q_latent = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # query in latent space
        scores = (torch.einsum("bthc,bsc->bhts", q_latent, kv)
                  + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)) * self.softmax_scale
        if mask is None:
            mask = causal_mask(T, kv.shape[1], kv.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).type_as(kv)
        out_latent = torch.einsum("bhts,bsc->bthc", probs, kv)
        out = torch.einsum("bthc,hvc->bthv", out_latent, w_uv)
        return self.wo(out.reshape(B, T, H * self.v_head_dim))

    def _absorbed_fused(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
        """:meth:`_absorbed` as four bmm's, rows (B, T*H), in fp32 (fp64 for an fp64 model): the same result
        up to rounding."""
        B, T, H, N = q_nope.shape
        S, C = kv.shape[1], self.kv_lora_rank
        dtype = torch.promote_types(kv.dtype, torch.float32)
        w_uk, w_uv_t = self._absorbed_matrices(dtype)  # (H, N, C), (H, C, V)
        kv_c = kv.to(dtype)
        if T <= MAX_NEW_TOKENS and dtype == torch.float32:  # one C++ call instead of the ~25 operations below
            out = absorbed_decode(q_nope.to(dtype), q_pe.to(dtype), kv_c, k_pe.to(dtype), mask, w_uk, w_uv_t,
                                  self.softmax_scale)
            if out is not None:
                return self.wo(out.view(B, T, H * self.v_head_dim).to(kv.dtype))
        q_latent = torch.bmm(q_nope.reshape(B * T, H, N).transpose(0, 1).to(dtype), w_uk)  # (H, B*T, C)
        q_latent = q_latent.transpose(0, 1).reshape(B, T * H, C)
        scores = torch.baddbmm(torch.bmm(q_latent, kv_c.transpose(1, 2)), q_pe.reshape(B, T * H, -1).to(dtype),
                               k_pe.to(dtype).transpose(1, 2), beta=self.softmax_scale, alpha=self.softmax_scale)
        if mask is not None:  # (B, 1, T, S) -> rows (t, h)
            scores.view(B, T, H, S).masked_fill_(~mask.transpose(1, 2), float("-inf"))
        elif T > 1:  # one new token sees every slot: nothing to mask
            scores.view(B, T, H, S).masked_fill_(~causal_mask(T, S, kv.device)[None, :, None], float("-inf"))
        probs = scores.softmax(dim=-1)  # (B, T*H, S)
        out_latent = torch.bmm(probs, kv_c).view(B * T, H, C).transpose(0, 1)  # (H, B*T, C)
        out = torch.bmm(out_latent, w_uv_t).transpose(0, 1)  # (B*T, H, V)
        return self.wo(out.reshape(B, T, H * self.v_head_dim).to(kv.dtype))

    def _absorbed_matrices(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.wkv_b.weight
        # Inference tensors keep no version counter; they are written only inside inference_mode.
        key = (weight.data_ptr(), 0 if weight.is_inference() else tensor_version(weight), dtype)
        if self._absorbed_weights is None or self._absorbed_weights[0] != key:
            wkv_b = weight.detach().to(dtype).view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim,
                                                   self.kv_lora_rank)
            w_uk = wkv_b[:, : self.qk_nope_head_dim].contiguous()
            w_uv_t = wkv_b[:, self.qk_nope_head_dim :].transpose(1, 2).contiguous()
            self._absorbed_weights = (key, w_uk, w_uv_t)
        return self._absorbed_weights[1], self._absorbed_weights[2]
