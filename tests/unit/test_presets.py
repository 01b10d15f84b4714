"""Presets: published parameter counts, KV-cache sizes, name lookup."""

import pytest
import torch

from deepseek_moe.model.counting import (
    count_parameters,
    flops_per_token,
    kv_cache_bytes_per_token,
    kv_cache_elements_per_token,
)
from deepseek_moe.presets import PRESETS, get_preset

# (total, activated) in billions as published; see model/counting.py for the convention.
PUBLISHED = {
    "deepseek-moe-2b": (2.0, 0.3, True),
    "deepseek-moe-16b": (16.4, 2.8, True),
    "deepseek-v2-lite": (15.7, 2.4, False),
    "deepseek-v2": (236.0, 21.0, False),
    "deepseek-v3": (671.0, 37.0, False),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_counts_match_published(name: str) -> None:
    total_b, activated_b, embedding_activated = PUBLISHED[name]
    total, activated = count_parameters(get_preset(name), embedding_activated=embedding_activated)
    # 2B's "0.3B" has one significant figure (half a unit: 17%). V2-Lite's "2.4B" is 2.45B rounded down: 2.1% off
    # under the V2/V3 papers' convention (11% off counting the embedding), hence 2.5% there.
    tolerance = {"deepseek-moe-2b": 0.17, "deepseek-v2-lite": 0.025}.get(name, 0.02)
    assert total / 1e9 == pytest.approx(total_b, rel=0.02)
    assert activated / 1e9 == pytest.approx(activated_b, rel=tolerance)


def test_counting_allocates_nothing_and_counts_experts_once() -> None:
    cfg = get_preset("tiny")
    total, activated = count_parameters(cfg)
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

    assert total == sum(p.numel() for p in DeepSeekMoEForCausalLM(cfg).parameters())
    routed_per_layer = 3 * cfg.moe.n_routed_experts * cfg.dim * cfg.moe.moe_inter_dim
    inactive = cfg.n_moe_layers * routed_per_layer * (1 - cfg.moe.n_activated_experts / cfg.moe.n_routed_experts)
    assert total - activated == inactive + cfg.vocab_size * cfg.dim
    assert 2e6 < total < 2e7  # "a few million": trains on a laptop CPU


def test_kv_cache_sizes() -> None:
    v2 = get_preset("deepseek-v2")
    assert kv_cache_elements_per_token(v2) == v2.n_layers * 576
    # The V2 paper's MHA baseline: 2 * n_heads * d_h with d_h = 128.
    mha = v2.replace(attention="mha", qk_nope_head_dim=64, qk_rope_head_dim=64)
    assert kv_cache_elements_per_token(mha) == v2.n_layers * 32768
    assert kv_cache_bytes_per_token(v2, torch.bfloat16) == v2.n_layers * 576 * 2
    m16 = get_preset("deepseek-moe-16b")
    assert kv_cache_elements_per_token(m16) == m16.n_layers * 2 * 16 * 128


def test_flops_per_token_grows_with_context() -> None:
    cfg = get_preset("deepseek-v2-lite")
    _, activated = count_parameters(cfg)
    assert flops_per_token(cfg) == 2 * activated
    assert flops_per_token(cfg, 1024) > flops_per_token(cfg)


def test_get_preset_names_and_errors() -> None:
    assert set(PRESETS) == {"tiny", "deepseek-moe-2b", "deepseek-moe-16b", "deepseek-v2-lite", "deepseek-v2",
                            "deepseek-v3"}
    assert get_preset("deepseek_v3").moe.score_func == "sigmoid"
    with pytest.raises(ValueError, match="valid names: tiny, deepseek-moe-2b"):
        get_preset("deepseek-v4")
    small = get_preset("tiny").replace(vocab_size=1000)
    assert small.vocab_size == 1000


def test_v3_routing_shapes() -> None:
    moe = get_preset("deepseek-v3").moe
    assert (moe.n_routed_experts, moe.n_activated_experts, moe.n_expert_groups, moe.n_limited_groups) == (256, 8, 8, 4)
    assert moe.use_routing_bias and moe.norm_topk_prob and moe.group_score_func == "top2_sum"


def test_presets_state_their_group_limit() -> None:
    import inspect


    limits = {name: (get_preset(name).moe.n_expert_groups, get_preset(name).moe.n_limited_groups) for name in PRESETS}
    assert limits == {"tiny": (4, 2), "deepseek-moe-2b": (1, 1), "deepseek-moe-16b": (1, 1),
                      "deepseek-v2-lite": (1, 1), "deepseek-v2": (8, 3), "deepseek-v3": (8, 4)}
    for name, build in PRESETS.items():  # written in the preset, not left to a default
        assert "n_limited_groups=" in inspect.getsource(build), name
    for name in PRESETS:  # the resolved dict round-trips
        cfg = get_preset(name)
        assert type(cfg).from_dict(cfg.to_dict()) == cfg
