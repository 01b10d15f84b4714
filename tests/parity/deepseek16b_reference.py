"""An independent DeepSeekMoE 16B (``model_type: "deepseek"``) built from transformers' Llama attention, rotary
embedding, RMSNorm and MLP modules, with our slow per-token MoE reference (deepseek_moe.moe.reference) for the
routed FFN. Its module tree spells the published checkpoint names (``model.layers.N.self_attn.q_proj.weight``,
``model.layers.N.mlp.experts.E.gate_proj.weight``, ...), so it loads a checkpoint with a plain
``load_state_dict`` — no code of ours maps a name.

The architecture facts come from deepseek-ai/deepseek-moe-16b-base's config.json and modeling_deepseek.py: LLaMA
attention (whole head rotary, split halves), dense LLaMA MLPs for the first ``first_k_dense_replace`` layers,
then softmax gates over plain top-K experts (normalised when ``norm_topk_prob``) plus one shared FFN of width
``n_shared_experts * moe_intermediate_size``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from deepseek_moe.config import MoEConfig
from deepseek_moe.moe.layer import MoE
from deepseek_moe.moe.reference import reference_forward, top_k_margin


def llama_config(hf: dict[str, Any], intermediate_size: int | None = None) -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=intermediate_size or hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"], num_key_value_heads=hf["num_key_value_heads"],
        max_position_embeddings=hf["max_position_embeddings"], rms_norm_eps=hf["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(hf["rope_theta"])},
        attention_bias=hf["attention_bias"], mlp_bias=False, hidden_act="silu")
    cfg._attn_implementation = "eager"
    return cfg


class Gate(nn.Module):
    def __init__(self, n_experts: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, dim))


class ReferenceMoE(nn.Module):
    """``mlp`` of a DeepSeekMoE layer: gate, experts.N, shared_experts; forward by the per-token reference."""

    def __init__(self, hf: dict[str, Any]) -> None:
        super().__init__()
        self.hf = hf
        self.gate = Gate(hf["n_routed_experts"], hf["hidden_size"])
        self.experts = nn.ModuleList(LlamaMLP(llama_config(hf, hf["moe_intermediate_size"]))
                                     for _ in range(hf["n_routed_experts"]))
        n_shared = hf.get("n_shared_experts") or 0
        self.shared_experts = (LlamaMLP(llama_config(hf, n_shared * hf["moe_intermediate_size"]))
                               if n_shared else None)

    def as_moe(self) -> MoE:
        """The same weights in the layer the per-token reference reads (stacked experts, fused shared)."""
        hf = self.hf
        moe = MoE(MoEConfig(dim=hf["hidden_size"], moe_inter_dim=hf["moe_intermediate_size"],
                            n_routed_experts=hf["n_routed_experts"], n_activated_experts=hf["num_experts_per_tok"],
                            n_shared_experts=hf.get("n_shared_experts") or 0,
                            norm_topk_prob=hf["norm_topk_prob"] and hf["num_experts_per_tok"] > 1))
        with torch.no_grad():
            moe.gate.weight.copy_(self.gate.weight)
            for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                getattr(moe.experts, ours).copy_(torch.stack([getattr(e, theirs).weight for e in self.experts]))
                if self.shared_experts is not None:
                    getattr(moe.shared_experts, ours).weight.copy_(getattr(self.shared_experts, theirs).weight)
        return moe.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference_forward(self.as_moe(), x)


class ReferenceLayer(nn.Module):
    def __init__(self, hf: dict[str, Any], i: int) -> None:
        super().__init__()
        cfg = llama_config(hf)
        self.input_layernorm = LlamaRMSNorm(hf["hidden_size"], hf["rms_norm_eps"])
        self.self_attn = LlamaAttention(cfg, i)
        self.post_attention_layernorm = LlamaRMSNorm(hf["hidden_size"], hf["rms_norm_eps"])
        self.mlp: nn.Module = LlamaMLP(cfg) if i < hf["first_k_dense_replace"] else ReferenceMoE(hf)

    def forward(self, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), position_embeddings=cos_sin, attention_mask=mask)[0]
        return h + self.mlp(self.post_attention_layernorm(h))


class ReferenceBody(nn.Module):
    def __init__(self, hf: dict[str, Any]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(hf["vocab_size"], hf["hidden_size"])
        self.layers = nn.ModuleList(ReferenceLayer(hf, i) for i in range(hf["num_hidden_layers"]))
        self.norm = LlamaRMSNorm(hf["hidden_size"], hf["rms_norm_eps"])
        self.rotary_emb = LlamaRotaryEmbedding(llama_config(hf))


class ReferenceDeepseek(nn.Module):
    """DeepseekForCausalLM's structure and names; ``forward(ids) -> logits`` (float32)."""

    def __init__(self, hf: dict[str, Any]) -> None:
        super().__init__()
        self.hf = hf
        self.model = ReferenceBody(hf)
        self.lm_head = nn.Linear(hf["hidden_size"], hf["vocab_size"], bias=False)

    def moe_inputs(self, ids: torch.Tensor) -> list[tuple[ReferenceMoE, torch.Tensor]]:
        seen: list[tuple[ReferenceMoE, torch.Tensor]] = []
        hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0].detach())))
                 for m in self.modules() if isinstance(m, ReferenceMoE)]
        try:
            self(ids)
        finally:
            for h in hooks:
                h.remove()
        return seen

    def routing_margin(self, ids: torch.Tensor) -> float:
        return min(top_k_margin(moe.as_moe(), x) for moe, x in self.moe_inputs(ids))

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        h = self.model.embed_tokens(ids)
        positions = torch.arange(T)[None].expand(ids.shape[0], T)
        cos_sin = self.model.rotary_emb(h, positions)
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]  # additive causal mask
        for layer in self.model.layers:
            h = layer(h, cos_sin, mask)
        return self.lm_head(self.model.norm(h)).float()


def randomise(model: nn.Module, generator: torch.Generator) -> None:
    """Every tensor redrawn (norms around 1, biases small, gates spread), as tests/parity/hf_fixtures does."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif name.endswith("gate.weight"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
