"""Model size arithmetic: parameters (total and activated per token), FLOPs per token, KV-cache bytes per token.

Everything is measured on modules built on the meta device, so the 671B preset costs no memory, and the numbers
cannot drift from the code that defines the model.

Counting convention (checked against the published figures in tests/unit/test_presets.py):

* total: every parameter, the input embedding and the output head counted separately when untied;
* activated: every parameter except the routed experts, plus the K routed experts a token uses per MoE layer
  (the shared experts are always active). The input embedding is a row lookup, not a matrix product; the
  DeepSeek-V2/V3 papers leave it out of the activated count (V2 21B, V3 37B, V2-Lite 2.4B) while the DeepSeekMoE
  paper (16B: 2.8B) counts it, hence ``embedding_activated``.
"""

from __future__ import annotations

import functools

import torch

from deepseek_moe.config import ModelConfig
from deepseek_moe.model.block import build_attention
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.model.kv_cache import LayerCache
from deepseek_moe.model.rope import RotaryEmbedding
from deepseek_moe.moe.all_layers import moe_layers


def _meta_model(cfg: ModelConfig) -> DeepSeekMoEForCausalLM:
    with torch.device("meta"):
        return DeepSeekMoEForCausalLM(cfg)


# Configs are frozen and hashable; caching saves rebuilding a 671B meta model for every figure of one report.
@functools.lru_cache(maxsize=64)
def count_parameters(cfg: ModelConfig, *, embedding_activated: bool = False) -> tuple[int, int]:
    """(total, activated per token) parameter counts of the model ``cfg`` describes."""
    model = _meta_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for _, moe in moe_layers(model):
        routed = sum(p.numel() for p in moe.experts.parameters())
        per_expert = routed // cfg.moe.n_routed_experts
        inactive += routed - per_expert * cfg.moe.n_activated_experts
    if not embedding_activated and not cfg.tie_word_embeddings:
        inactive += model.embed.weight.numel()
    return total, total - inactive


def flops_per_token(cfg: ModelConfig, context_len: int = 0) -> int:
    """Forward FLOPs for one token attending to ``context_len`` keys: 2 per activated weight (embedding lookup
    excluded) plus the attention scores and weighted values in the expanded (naive) form. Training costs about
    three times this (the backward pass is two matrix products per forward one)."""
    _, activated = count_parameters(cfg)
    attention = 2 * cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * context_len
    return 2 * activated + attention


def kv_cache_elements_per_token(cfg: ModelConfig) -> int:
    """Cached elements per token over all layers: MLA n_layers * (kv_lora_rank + qk_rope_head_dim), MHA
    n_layers * n_heads * (qk_head_dim + v_head_dim). Measured by running one token of one layer on meta."""
    with torch.device("meta"):
        attn = build_attention(cfg)
        rope = RotaryEmbedding(cfg)
        cos, sin = rope(torch.zeros(1, 1, dtype=torch.long))
        cache = LayerCache()
        attn(torch.empty(1, 1, cfg.dim), cos, sin, None, cache)
    return cfg.n_layers * cache.numel()


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    return kv_cache_elements_per_token(cfg) * torch.empty((), dtype=dtype).element_size()
