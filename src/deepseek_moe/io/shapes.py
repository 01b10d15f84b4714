"""Which config fields give each dimension of each of our tensors: the words of a shape error.

The model built from the config is the truth about shapes (the loader compares the files' headers with it); this
table only says, for a mismatch, which config.json field to look at. A test checks it against the model for
every layout, so it cannot drift.
"""

from __future__ import annotations

import re

from deepseek_moe.config import ModelConfig

# Our field names -> the config.json key of the Hugging Face layouts, where they differ.
HF_FIELD = {"dim": "hidden_size", "inter_dim": "intermediate_size", "moe_inter_dim": "moe_intermediate_size",
            "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers"}

_QK = "n_heads * (qk_nope_head_dim + qk_rope_head_dim)"
# One row per tensor: our name ({i}: layer), then the fields of each dimension (a stacked expert tensor's
# first dimension, n_routed_experts, is left out: one expert's row).
DIM_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("embed.weight", ("vocab_size", "dim")),
    ("head.weight", ("vocab_size", "dim")),
    ("norm.weight", ("dim",)),
    ("layers.{i}.attn_norm.weight", ("dim",)),
    ("layers.{i}.ffn_norm.weight", ("dim",)),
    ("layers.{i}.attn.wq.weight", (_QK, "dim")),
    ("layers.{i}.attn.wq.bias", (_QK,)),
    ("layers.{i}.attn.wk.weight", (_QK, "dim")),
    ("layers.{i}.attn.wk.bias", (_QK,)),
    ("layers.{i}.attn.wv.weight", ("n_heads * v_head_dim", "dim")),
    ("layers.{i}.attn.wv.bias", ("n_heads * v_head_dim",)),
    ("layers.{i}.attn.wq_a.weight", ("q_lora_rank", "dim")),
    ("layers.{i}.attn.wq_a.bias", ("q_lora_rank",)),
    ("layers.{i}.attn.q_norm.weight", ("q_lora_rank",)),
    ("layers.{i}.attn.wq_b.weight", (_QK, "q_lora_rank")),
    ("layers.{i}.attn.wkv_a.weight", ("kv_lora_rank + qk_rope_head_dim", "dim")),
    ("layers.{i}.attn.wkv_a.bias", ("kv_lora_rank + qk_rope_head_dim",)),
    ("layers.{i}.attn.kv_norm.weight", ("kv_lora_rank",)),
    ("layers.{i}.attn.wkv_b.weight", ("n_heads * (qk_nope_head_dim + v_head_dim)", "kv_lora_rank")),
    ("layers.{i}.attn.wo.weight", ("dim", "n_heads * v_head_dim")),
    ("layers.{i}.attn.wo.bias", ("dim",)),
    ("layers.{i}.ffn.w1.weight", ("inter_dim", "dim")),
    ("layers.{i}.ffn.w3.weight", ("inter_dim", "dim")),
    ("layers.{i}.ffn.w2.weight", ("dim", "inter_dim")),
    ("layers.{i}.ffn.gate.weight", ("n_routed_experts", "dim")),
    ("layers.{i}.ffn.gate.e_score_correction_bias", ("n_routed_experts",)),
    ("layers.{i}.ffn.shared_experts.w1.weight", ("n_shared_experts * moe_inter_dim", "dim")),
    ("layers.{i}.ffn.shared_experts.w3.weight", ("n_shared_experts * moe_inter_dim", "dim")),
    ("layers.{i}.ffn.shared_experts.w2.weight", ("dim", "n_shared_experts * moe_inter_dim")),
    ("layers.{i}.ffn.experts.w1", ("moe_inter_dim", "dim")),
    ("layers.{i}.ffn.experts.w3", ("moe_inter_dim", "dim")),
    ("layers.{i}.ffn.experts.w2", ("dim", "moe_inter_dim")),
)
_TABLE = [(re.compile(re.escape(name).replace(r"\{i\}", r"\d+") + r"\Z"), fields) for name, fields in DIM_FIELDS]
_WORD = re.compile(r"[a-z_]+")


def dim_fields(name: str) -> tuple[str, ...] | None:
    """The field expression of each dimension of our tensor ``name`` (a stacked expert tensor: of one row)."""
    for pattern, fields in _TABLE:
        if pattern.match(name):
            return fields
    return None


def field_value(expression: str, cfg: ModelConfig) -> int:
    """``expression`` (a DIM_FIELDS entry) evaluated on ``cfg``."""
    values = {f: getattr(cfg.moe if f in ("n_routed_experts", "n_shared_experts", "moe_inter_dim") else cfg, f)
              for f in _WORD.findall(expression)}
    return int(eval(expression, {"__builtins__": {}}, values))  # our own table's arithmetic, no names but its fields


def in_config_terms(expression: str, *, hf: bool) -> str:
    """``expression`` with the config.json keys of the layout (Hugging Face names when ``hf``)."""
    return _WORD.sub(lambda m: HF_FIELD.get(m.group(0), m.group(0)) if hf else m.group(0), expression)


def explain_mismatch(name: str, stored: tuple[int, ...], expected: tuple[int, ...], *, hf: bool) -> str:
    """Which config field gives the first dimension in which ``stored`` and ``expected`` differ."""
    fields = dim_fields(name.removesuffix("_scale").replace(".qweight", ".weight"))
    if len(stored) != len(expected):
        return f"{len(stored)} dimensions stored, {len(expected)} expected"
    d = next(i for i, (a, b) in enumerate(zip(stored, expected, strict=True)) if a != b)
    if fields is None or d >= len(fields):
        return f"dimension {d} differs"
    return (f"dimension {d} follows from {in_config_terms(fields[d], hf=hf)}: {expected[d]} by the config, "
            f"{stored[d]} in the file")


__all__ = ["DIM_FIELDS", "HF_FIELD", "dim_fields", "explain_mismatch", "field_value", "in_config_terms"]
