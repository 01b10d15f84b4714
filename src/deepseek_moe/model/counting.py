"""Model size arithmetic: parameters (total and activated per token), FLOPs per token, KV-cache bytes per token,
and every parameter's shape (what :mod:`deepseek_moe.model.memory` shards over ranks).

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
import math
from dataclasses import dataclass

import torch

from deepseek_moe.config import ModelConfig
from deepseek_moe.model.block import build_attention
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.model.kv_cache import LayerCache
from deepseek_moe.model.rope import RotaryEmbedding
from deepseek_moe.moe.experts import RoutedExperts


def _meta_model(cfg: ModelConfig) -> DeepSeekMoEForCausalLM:
    with torch.device("meta"):
        return DeepSeekMoEForCausalLM(cfg)


@dataclass(frozen=True)
class ParameterShape:
    """One parameter of the model: its state_dict name, global shape, and whether it is a routed-expert weight
    (the parameters expert parallelism shards over ranks; everything else is replicated or FSDP-sharded)."""

    name: str
    shape: tuple[int, ...]
    routed_expert: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# Configs are frozen and hashable; caching saves rebuilding a model for every figure of one report.
@functools.lru_cache(maxsize=256)
def parameter_shapes(cfg: ModelConfig) -> tuple[ParameterShape, ...]:
    """Every parameter of the model ``cfg`` describes, in module order (a tied head counted once).

    Built on meta with one block of each kind (the dense blocks, then one MoE block standing for all the others:
    a block's shapes do not depend on its index), so a 671B model takes a fraction of a second."""
    n_built = min(cfg.n_layers, cfg.n_dense_layers + 1)
    model = _meta_model(cfg.replace(n_layers=n_built))
    routed = {id(p) for module in model.modules() if isinstance(module, RoutedExperts) for p in module.parameters()}
    before: list[ParameterShape] = []
    blocks: list[list[ParameterShape]] = [[] for _ in range(n_built)]
    after: list[ParameterShape] = []
    for name, p in model.named_parameters():
        shape = ParameterShape(name, tuple(p.shape), id(p) in routed)
        if name.startswith("layers."):
            blocks[int(name.split(".")[1])].append(shape)
        else:
            (after if blocks[-1] else before).append(shape)
    last = blocks[-1]
    for i in range(n_built, cfg.n_layers):
        prefix = f"layers.{i}."
        blocks.append([ParameterShape(prefix + p.name.split(".", 2)[2], p.shape, p.routed_expert) for p in last])
    return (*before, *(p for block in blocks for p in block), *after)


@functools.lru_cache(maxsize=64)
def count_parameters(cfg: ModelConfig, *, embedding_activated: bool = False) -> tuple[int, int]:
    """(total, activated per token) parameter counts of the model ``cfg`` describes."""
    shapes = parameter_shapes(cfg)
    total = sum(p.numel for p in shapes)
    moe = cfg.moe
    # Of each layer's routed experts (dim 0 the expert index) a token uses K of E.
    inactive = sum(p.numel // moe.n_routed_experts * (moe.n_routed_experts - moe.n_activated_experts)
                   for p in shapes if p.routed_expert)
    if not embedding_activated and not cfg.tie_word_embeddings:
        inactive += next(p.numel for p in shapes if p.name == "embed.weight")
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
