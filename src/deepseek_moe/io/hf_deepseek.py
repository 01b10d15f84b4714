"""DeepSeekMoE 16B's own Hugging Face layout (``model_type: "deepseek"``): config.json <-> ModelConfig.

As published with deepseek-ai/deepseek-moe-16b-base and -chat (their config.json and modeling_deepseek.py; no
transformers class exists for it): LLaMA attention (``self_attn.{q,k,v,o}_proj``, the whole head rotary on split
halves, ``head_dim = hidden_size / num_attention_heads``), the DeepSeekMoE FFN (``mlp.gate.weight``,
``mlp.experts.N.{gate,up,down}_proj``, ``mlp.shared_experts.*`` as one FFN of width ``n_shared_experts *
moe_intermediate_size``) after ``first_k_dense_replace`` dense layers, softmax gates over plain top-K (no
groups, no scaling factor), normalised when ``norm_topk_prob``. Tensor names are the same table as V2/V3's
(io/hf.py), with ``k_proj`` and ``v_proj`` for MHA. The balance recipe comes from ``aux_loss_alpha`` and
``seq_aux``, which this format states.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.io.hf_common import check_quantization, token_id

MODEL_TYPE = "deepseek"
ARCHITECTURE = "DeepseekForCausalLM"

# configuration_deepseek.py's defaults for keys that change behaviour, used when config.json leaves them out.
DEFAULTS: dict[str, Any] = {
    "n_shared_experts": None, "first_k_dense_replace": 0, "moe_layer_freq": 1, "norm_topk_prob": False,
    "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "bos_token_id": 100000,
    "eos_token_id": 100001, "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None,
    "attention_bias": False,
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads")


def config_from_deepseek(hf: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Translate a DeepSeekMoE (``model_type: "deepseek"``) config.json dict; errors name ``source`` and key."""
    check_quantization(hf, source)

    def get(key: str) -> Any:
        value = hf.get(key)
        return DEFAULTS.get(key) if value is None else value

    def reject(key: str, value: Any, rule: str) -> NoReturn:
        raise ValueError(f"{source}: {key} ({value!r}) {rule}")

    missing = [k for k in REQUIRED if hf.get(k) is None]
    if missing:
        raise ValueError(f"{source}: missing key(s) {', '.join(missing)}")
    if hf.get("n_routed_experts") is None or hf.get("num_experts_per_tok") is None:
        raise ValueError(f"{source}: n_routed_experts and num_experts_per_tok are required (a DeepSeekMoE "
                         "checkpoint without routed experts is a dense LLaMA model, which this package does not load)")
    if get("hidden_act") != "silu":
        reject("hidden_act", hf["hidden_act"], "is not supported; DeepSeekMoE uses 'silu'")
    if get("scoring_func") != "softmax":
        reject("scoring_func", hf["scoring_func"], "is not supported by model_type 'deepseek' (softmax only)")
    if get("moe_layer_freq") != 1:
        reject("moe_layer_freq", hf["moe_layer_freq"], "is not supported; every layer after "
               "first_k_dense_replace is MoE")
    if hf.get("mlp_bias"):
        reject("mlp_bias", hf["mlp_bias"], "is not supported (no biases in DeepSeekMoE's FFNs)")
    n_heads, dim = int(hf["num_attention_heads"]), int(hf["hidden_size"])
    if hf.get("num_key_value_heads") not in (None, n_heads):
        reject("num_key_value_heads", hf["num_key_value_heads"], f"must equal num_attention_heads ({n_heads}); "
               "grouped-query attention is not supported")
    if dim % n_heads:
        reject("hidden_size", dim, f"must be a multiple of num_attention_heads ({n_heads})")
    rope_scaling = get("rope_scaling")
    if rope_scaling and (rope_scaling.get("rope_type") or rope_scaling.get("type")) not in (None, "default"):
        reject("rope_scaling", rope_scaling, "is not supported (DeepSeekMoE 16B ships without RoPE scaling)")

    head_dim = dim // n_heads
    init_std = float(get("initializer_range"))
    max_pos = int(get("max_position_embeddings"))
    try:
        moe = MoEConfig(dim=dim, moe_inter_dim=int(hf["moe_intermediate_size"]),
                        n_routed_experts=int(hf["n_routed_experts"]),
                        n_activated_experts=int(hf["num_experts_per_tok"]),
                        n_shared_experts=int(get("n_shared_experts") or 0), score_func="softmax",
                        # modeling_deepseek.py normalises only when top_k > 1
                        norm_topk_prob=bool(get("norm_topk_prob")) and int(hf["num_experts_per_tok"]) > 1,
                        init_std=init_std,
                        expert_loss_alpha=float(get("aux_loss_alpha")),
                        balance_loss_scope="sequence" if get("seq_aux") else "batch")
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]), dim=dim, inter_dim=int(hf["intermediate_size"]),
            n_layers=int(hf["num_hidden_layers"]), n_dense_layers=int(get("first_k_dense_replace")),
            n_heads=n_heads, moe=moe, max_seq_len=max_pos, attention="mha", attention_bias=bool(get("attention_bias")),
            kv_lora_rank=0, qk_nope_head_dim=0, qk_rope_head_dim=head_dim, v_head_dim=head_dim,
            rope_theta=float(get("rope_theta")), rope_interleave=False, original_seq_len=max_pos,
            norm_eps=float(get("rms_norm_eps")), tie_word_embeddings=bool(get("tie_word_embeddings")),
            init_std=init_std,  # an explicit null token id stays null
            bos_token_id=token_id(hf.get("bos_token_id", DEFAULTS["bos_token_id"]), "bos_token_id", source),
            eos_token_id=token_id(hf.get("eos_token_id", DEFAULTS["eos_token_id"]), "eos_token_id", source))
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err


def deepseek_incompatibility(cfg: ModelConfig) -> str | None:
    """What DeepSeekMoE 16B's format cannot express about ``cfg``, or None when it holds it exactly."""
    moe = cfg.moe
    rules = [
        (cfg.attention == "mha", f"attention={cfg.attention!r} (only 'mha')"),
        (cfg.mtp_depth == 0, f"mtp_depth={cfg.mtp_depth} (no multi-token-prediction modules)"),
        (cfg.qk_nope_head_dim == 0, f"qk_nope_head_dim={cfg.qk_nope_head_dim} (the whole head is rotary)"),
        (cfg.v_head_dim == cfg.qk_rope_head_dim and cfg.n_heads * cfg.v_head_dim == cfg.dim,
         f"head dims qk {cfg.qk_rope_head_dim}, v {cfg.v_head_dim} with {cfg.n_heads} heads and dim {cfg.dim} "
         "(needs head_dim = dim / n_heads for q, k and v)"),
        (not cfg.rope_interleave, "rope_interleave=True (LLaMA rotates split halves)"),
        (cfg.rope_factor == 1.0, f"rope_factor={cfg.rope_factor} (no YaRN)"),
        (moe.score_func == "softmax", f"score_func={moe.score_func!r} (softmax only)"),
        (not moe.use_routing_bias, "use_routing_bias=True"),
        (moe.n_expert_groups == 1, f"n_expert_groups={moe.n_expert_groups} (no expert groups)"),
        (moe.route_scale == 1.0, f"route_scale={moe.route_scale} (no routed scaling factor)"),
        (not (moe.norm_topk_prob and moe.n_activated_experts == 1),
         "norm_topk_prob=True with one activated expert (never normalised there)"),
    ]
    broken = [what for ok, what in rules if not ok]
    return f"DeepSeekMoE 16B's format (model_type 'deepseek') cannot express {'; '.join(broken)}" if broken else None


def config_to_deepseek(cfg: ModelConfig, *, dtype: str | None = None) -> dict[str, Any]:
    """DeepSeekMoE 16B's config.json for ``cfg`` (ValueError saying what it cannot express)."""
    reason = deepseek_incompatibility(cfg)
    if reason:
        raise ValueError(reason)
    moe = cfg.moe
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": moe.moe_inter_dim, "num_hidden_layers": cfg.n_layers,
        "first_k_dense_replace": cfg.n_dense_layers, "moe_layer_freq": 1, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "initializer_range": cfg.init_std,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0, "n_routed_experts": moe.n_routed_experts,
        "n_shared_experts": moe.n_shared_experts or None, "num_experts_per_tok": moe.n_activated_experts,
        "norm_topk_prob": moe.norm_topk_prob, "scoring_func": "softmax", "aux_loss_alpha": moe.expert_loss_alpha,
        "seq_aux": moe.balance_loss_scope == "sequence", "pretraining_tp": 1, "use_cache": True,
    }
    if dtype is not None:
        out["torch_dtype"] = dtype
    return out


__all__ = ["ARCHITECTURE", "MODEL_TYPE", "config_from_deepseek", "config_to_deepseek", "deepseek_incompatibility"]
