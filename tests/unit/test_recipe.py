"""Issue 8 item 5: a checkpoint loaded from Hugging Face gets the published balance recipe that fits its routing
(decided from the config, not model_type), and the presets state the same recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.io import checkpoint_format, load_pretrained, published_recipe, save_pretrained
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.presets import PRESETS, get_preset

RECIPE_FIELDS = ("expert_loss_alpha", "device_loss_alpha", "comm_loss_alpha", "seq_loss_alpha", "capacity_factor")


def _tiny(moe: dict[str, Any], **changes: Any) -> ModelConfig:
    heads = {"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, **changes}
    return ModelConfig(vocab_size=64, dim=32, inter_dim=48, n_layers=2, n_dense_layers=1, n_heads=2,
                       moe=MoEConfig(dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2,
                                     expert_loss_alpha=0.5, **moe),  # a generic value the load must replace
                       **heads)


KINDS: dict[str, tuple[ModelConfig, str, dict[str, Any]]] = {
    "v2_grouped": (_tiny({"n_expert_groups": 4, "n_limited_groups": 2}), "deepseek_v2",
                   {"expert_loss_alpha": 0.003, "device_loss_alpha": 0.05, "comm_loss_alpha": 0.02,
                    "seq_loss_alpha": 0.0, "capacity_factor": 1.0, "use_routing_bias": False}),
    "v2_lite_ungrouped": (_tiny({}), "deepseek_v2",
                          {"expert_loss_alpha": 0.001, "device_loss_alpha": 0.0, "comm_loss_alpha": 0.0,
                           "seq_loss_alpha": 0.0, "capacity_factor": None}),
    "v3": (_tiny({"score_func": "sigmoid", "use_routing_bias": True, "group_score_func": "top2_sum",
                  "n_expert_groups": 4, "n_limited_groups": 2, "bias_update_speed": 0.01}), "deepseek_v3",
           {"expert_loss_alpha": 0.0, "device_loss_alpha": 0.0, "comm_loss_alpha": 0.0, "seq_loss_alpha": 1e-4,
            "capacity_factor": None, "use_routing_bias": True, "bias_update_speed": 0.001}),
    "deepseekmoe_16b_layout": (_tiny({}, attention="mha", kv_lora_rank=0, qk_nope_head_dim=0,
                                     qk_rope_head_dim=16, v_head_dim=16, rope_interleave=False), "deepseek",
                               {"expert_loss_alpha": 0.5, "device_loss_alpha": 0.0, "capacity_factor": None}),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_loads_with_its_published_recipe(kind: str, tmp_path: Path) -> None:
    cfg, fmt, expected = KINDS[kind]
    assert save_pretrained(DeepSeekMoEForCausalLM(cfg), tmp_path) == fmt
    moe = load_pretrained(tmp_path).config.moe
    got = {field: getattr(moe, field) for field in expected}
    assert got == pytest.approx(expected), kind


def test_16b_layout_states_its_alpha_and_scope(tmp_path: Path) -> None:
    """DeepSeekMoE 16B's config.json says aux_loss_alpha and seq_aux; those are its recipe, kept both ways."""
    cfg, _, _ = KINDS["deepseekmoe_16b_layout"]
    cfg = cfg.replace(moe=cfg.moe.replace(expert_loss_alpha=0.001, balance_loss_scope="batch"))
    save_pretrained(DeepSeekMoEForCausalLM(cfg), tmp_path)
    moe = load_pretrained(tmp_path).config.moe
    assert (moe.expert_loss_alpha, moe.balance_loss_scope) == (0.001, "batch")


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "tiny"])
def test_presets_state_the_published_recipe(name: str) -> None:
    moe = get_preset(name).moe
    recipe = published_recipe(moe)
    assert {f: getattr(moe, f) for f in recipe} == recipe
    assert checkpoint_format(get_preset(name)) in ("deepseek", "deepseek_v2", "deepseek_v3")


def test_recipe_follows_the_routing_not_the_model_type() -> None:
    """V2 and V2-Lite share model_type deepseek_v2: the group limit decides."""
    lite, v2 = get_preset("deepseek-v2-lite"), get_preset("deepseek-v2")
    assert published_recipe(lite.moe)["capacity_factor"] is None
    assert published_recipe(v2.moe)["capacity_factor"] == 1.0
    assert torch.tensor(published_recipe(v2.moe)["device_loss_alpha"]) == 0.05
