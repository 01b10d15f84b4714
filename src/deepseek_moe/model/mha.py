"""Standard multi-head attention (DeepSeekMoE 2B/16B, and the baseline MLA is measured against).

Heads have MLA's shapes: a query/key head is qk_nope_head_dim position-free dims followed by qk_rope_head_dim
rotary dims; a value head is v_head_dim. DeepSeekMoE's LLaMA-style heads are qk_nope_head_dim = 0 with the whole
head rotary. The cache holds full keys and values: H * (qk_head_dim + v_head_dim) elements per token per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.config import ModelConfig
from deepseek_moe.model.kv_cache import LayerCache
from deepseek_moe.model.mla import causal_mask
from deepseek_moe.model.rope import apply_rotary, softmax_scale
from deepseek_moe.nn.linear import Linear


class MHA(nn.Module):
    """Multi-head attention with wq, wk, wv, wo (biased when ``attention_bias``, as LLaMA's q/k/v/o_proj).
    io/ maps them to DeepSeekMoE 16B's ``self_attn.{q,k,v,o}_proj``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.rope_interleave = cfg.rope_interleave
        self.softmax_scale = softmax_scale(cfg)
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.qk_head_dim, bias=cfg.attention_bias)
        self.wk = Linear(cfg.dim, cfg.n_heads * cfg.qk_head_dim, bias=cfg.attention_bias)
        self.wv = Linear(cfg.dim, cfg.n_heads * cfg.v_head_dim, bias=cfg.attention_bias)
        self.wo = Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=cfg.attention_bias)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        nope, pe = x.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return torch.cat((nope, apply_rotary(pe, cos, sin, self.rope_interleave)), dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: LayerCache | None = None) -> torch.Tensor:
        """x (B, T, dim); cos/sin (B, T, R/2); mask (B, 1, T, S) bool or None (causal). Returns (B, T, dim)."""
        B, T, _ = x.shape
        q = self._rotate(self.wq(x).view(B, T, self.n_heads, self.qk_head_dim), cos, sin)
        k = self._rotate(self.wk(x).view(B, T, self.n_heads, self.qk_head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_heads, self.v_head_dim)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, S, H, qk_head_dim), (B, S, H, v_head_dim)
        S = k.shape[1]
        if mask is None and S != T:
            mask = causal_mask(T, S, x.device)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim))
