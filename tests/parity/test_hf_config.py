"""config.json <-> ModelConfig: DeepSeek's published configs, and round trips of what we write."""

from __future__ import annotations

from typing import Any

import pytest

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.io import config_from_hf, config_to_hf
from deepseek_moe.io.recipe import with_published_recipe

# DeepSeek-V2-Lite's config.json as published (remote-code era: rope_theta + rope_scaling, extra keys).
V2_LITE: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "ep_size": 1,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}
V2_FULL = {**V2_LITE, "q_lora_rank": 1536, "n_routed_experts": 160, "n_group": 8, "topk_group": 3,
           "topk_method": "group_limited_greedy", "routed_scaling_factor": 16.0, "hidden_size": 5120,
           "num_hidden_layers": 60, "num_attention_heads": 128, "num_key_value_heads": 128}
V3_BF16 = {**V2_LITE, "model_type": "deepseek_v3", "q_lora_rank": 1536, "n_routed_experts": 256, "n_group": 8,
           "topk_group": 4, "num_experts_per_tok": 8, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
           "norm_topk_prob": True, "routed_scaling_factor": 2.5, "n_shared_experts": 1, "first_k_dense_replace": 3,
           "num_nextn_predict_layers": 1, "hidden_size": 7168, "num_attention_heads": 128,
           "num_key_value_heads": 128,
           "rope_scaling": {**V2_LITE["rope_scaling"], "mscale": 1.0, "mscale_all_dim": 1.0}}


def test_v2_lite_published() -> None:
    cfg = config_from_hf(V2_LITE)
    assert (cfg.dim, cfg.n_layers, cfg.n_dense_layers, cfg.q_lora_rank, cfg.max_seq_len) == (2048, 27, 1, 0, 163840)
    assert cfg.rope_interleave and cfg.rope_factor == 40 and cfg.original_seq_len == 4096
    assert (cfg.mscale, cfg.mscale_all_dim) == (0.707, 0.707)
    moe = cfg.moe
    assert (moe.score_func, moe.n_routed_experts, moe.n_activated_experts, moe.n_shared_experts) == ("softmax", 64, 6, 2)
    assert not moe.group_limited and not moe.use_routing_bias and not moe.norm_topk_prob
    assert (cfg.bos_token_id, cfg.eos_token_id) == (100000, 100001)


def test_v2_group_limited_published() -> None:
    moe = config_from_hf(V2_FULL).moe
    assert (moe.n_expert_groups, moe.n_limited_groups, moe.group_score_func, moe.route_scale) == (8, 3, "max", 16.0)


def test_v3_published_bf16() -> None:
    cfg = config_from_hf(V3_BF16)
    moe = cfg.moe
    assert (moe.score_func, moe.group_score_func, moe.use_routing_bias, moe.norm_topk_prob) == (
        "sigmoid", "top2_sum", True, True)
    assert (moe.n_expert_groups, moe.n_limited_groups, moe.route_scale) == (8, 4, 2.5)
    assert cfg.q_lora_rank == 1536 and cfg.rope_interleave


def test_v2_greedy_keeps_groups_without_limit() -> None:
    moe = config_from_hf({**V2_FULL, "topk_method": "greedy"}).moe
    assert (moe.n_expert_groups, moe.n_limited_groups) == (8, 8) and not moe.group_limited


def test_v2_ignores_norm_topk_prob_like_transformers() -> None:
    assert config_from_hf({**V2_LITE, "norm_topk_prob": True}).moe.norm_topk_prob is False


def test_transformers5_rope_parameters_equal_published_rope_scaling() -> None:
    scaling = dict(V2_LITE["rope_scaling"])
    params = {"rope_type": scaling.pop("type"), "rope_theta": 10000.0, **scaling}
    new_style = {k: v for k, v in V2_LITE.items() if k not in ("rope_scaling", "rope_theta")}
    assert config_from_hf({**new_style, "rope_parameters": params}) == config_from_hf(V2_LITE)


def test_yarn_mscale_without_mscale_all_dim_is_transformers_default() -> None:
    cfg = config_from_hf({**V2_LITE, "rope_scaling": {**V2_LITE["rope_scaling"], "mscale_all_dim": None}})
    assert (cfg.mscale, cfg.mscale_all_dim) == (1.0, 0.0)


def test_yarn_mscale_all_dim_alone_is_refused() -> None:
    with pytest.raises(ValueError, match="mscale_all_dim"):
        config_from_hf({**V2_LITE, "rope_scaling": {**V2_LITE["rope_scaling"], "mscale": None}})


def _tiny(moe: dict[str, Any], **changes: Any) -> ModelConfig:
    return ModelConfig(vocab_size=64, dim=32, inter_dim=48, n_layers=3, n_dense_layers=1, n_heads=2,
                       moe=MoEConfig(dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2, **moe),
                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                       **{"max_seq_len": 512, "original_seq_len": 512, **changes})


@pytest.mark.parametrize("cfg", [
    _tiny({"n_shared_experts": 2, "route_scale": 1.5}),
    _tiny({"n_expert_groups": 4, "n_limited_groups": 2}, q_lora_rank=24),
    _tiny({"n_expert_groups": 4, "n_limited_groups": 4}),
    _tiny({"score_func": "sigmoid", "use_routing_bias": True, "group_score_func": "top2_sum", "n_expert_groups": 4,
           "n_limited_groups": 2, "norm_topk_prob": True, "route_scale": 2.5}, rope_interleave=False),
    _tiny({"score_func": "sigmoid", "use_routing_bias": True, "group_score_func": "top2_sum"}, rope_factor=4.0, original_seq_len=128,
          mscale=0.707, mscale_all_dim=0.707, rope_theta=5e4, tie_word_embeddings=True, bos_token_id=3),
], ids=["v2_greedy", "v2_group_limited", "v2_all_groups", "v3_split_halves", "v3_yarn_tied"])
def test_config_round_trip(cfg: ModelConfig) -> None:
    """Exact for configs whose inert fields already hold what a checkpoint implies (V3 ranks groups by top2_sum;
    without YaRN original_seq_len is max_seq_len); attn_impl is not in config.json and the balance fields come
    back as the published recipe for the routing (io/recipe.py)."""
    hf = config_to_hf(cfg)
    assert config_from_hf(hf) == cfg.replace(moe=with_published_recipe(cfg.moe))
    assert config_to_hf(config_from_hf(hf)) == hf


def test_sigmoid_without_bias_saves_as_v3() -> None:
    hf = config_to_hf(_tiny({"score_func": "sigmoid"}))
    assert hf["model_type"] == "deepseek_v3" and hf["scoring_func"] == "sigmoid"
