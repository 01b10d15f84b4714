"""A saved model keeps its adapted capacity factors (issue 25): our format's config.json records each adaptive
layer's factor and from_pretrained restores it, so a reloaded model drops and adapts from where training left
it, not from ``capacity_factor`` (the start)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepseek_moe import from_pretrained, save_pretrained
from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.io.load import load_into
from deepseek_moe.io.streaming import CheckpointError
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.moe.all_layers import moe_layers
from deepseek_moe.moe.capacity import update_capacity

START = 1.0


def _model(**moe: object) -> DeepSeekMoEForCausalLM:
    # softmax scores with the routing bias: no public layout holds it, so save_pretrained writes our format.
    # One group per expert, so the budget is per expert and a factor below 1 drops; no protected sequences, so
    # what a forward drops depends on the factor alone (not on how many draws the model made before).
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, inter_dim=64, n_layers=3, n_dense_layers=1, n_heads=2, max_seq_len=32,
                      original_seq_len=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                      moe=MoEConfig(dim=32, moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2,
                                    n_expert_groups=4, use_routing_bias=True, capacity_factor=START,
                                    protected_fraction=0.0, capacity_min=0.5, capacity_max=2.0, **moe))  # type: ignore[arg-type]
    return DeepSeekMoEForCausalLM(cfg)


def _factors(model: torch.nn.Module) -> dict[str, float]:
    return {name: moe.capacity_factor for name, moe in moe_layers(model)}  # type: ignore[misc]


def test_a_saved_model_reloads_with_its_adapted_factors(tmp_path: Path) -> None:
    model = _model(capacity_policy="adaptive", drop_at_inference=True, capacity_update_rate=1.0)
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    # A training step's loads move each layer's factor (update rate 1: straight to the measured one).
    model.train()
    model(tokens)
    update_capacity(model)
    moved = _factors(model)
    assert len(moved) == 2 and all(f != START for f in moved.values()), moved
    model.eval()
    with torch.no_grad():
        expected = model(tokens).logits

    assert save_pretrained(model, tmp_path / "m") == "deepseek_moe"
    saved = json.loads((tmp_path / "m/config.json").read_text())
    assert saved["capacity_factors"] == moved  # JSON floats round-trip exactly
    assert saved["config"]["moe"]["capacity_factor"] == START  # the config still says where it started

    loaded = from_pretrained(tmp_path / "m")
    assert _factors(loaded) == moved
    built = DeepSeekMoEForCausalLM(loaded.config)  # the path a sharded load takes: fill a model already built
    load_into(built, tmp_path / "m")
    assert _factors(built) == moved
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, expected, rtol=0, atol=0)
    # The factor decides what is dropped at inference here: at the start factor the output is another one.
    for _, moe in moe_layers(loaded):
        moe.capacity_now = START
    with torch.no_grad():
        assert not torch.equal(loaded(tokens).logits, expected)


def test_fixed_capacity_models_write_no_factors(tmp_path: Path) -> None:
    save_pretrained(_model(), tmp_path / "m")
    assert "capacity_factors" not in json.loads((tmp_path / "m/config.json").read_text())
    assert set(_factors(from_pretrained(tmp_path / "m")).values()) == {START}


@pytest.mark.parametrize(("factors", "message"), [
    ({"layers.1.ffn": 5.0}, r"capacity_factors\['layers.1.ffn'\] \(5.0\) must be a number within "
                            r"\[capacity_min, capacity_max\] = \[0.5, 2.0\]"),
    ({"layers.1.ffn": "1.2"}, r"capacity_factors\['layers.1.ffn'\] \('1.2'\) must be a number"),
    ({"layers.7.ffn": 1.2}, r"capacity_factors\['layers.7.ffn'\]: the model has no adaptive-capacity MoE layer"),
    ([1.2, 1.3], r"capacity_factors must be a JSON object"),
])
def test_bad_saved_factors_are_refused_naming_the_file_and_layer(tmp_path: Path, factors: object,
                                                                 message: str) -> None:
    save_pretrained(_model(capacity_policy="adaptive"), tmp_path / "m")
    config_file = tmp_path / "m/config.json"
    raw = json.loads(config_file.read_text())
    assert set(raw["capacity_factors"]) == {"layers.1.ffn", "layers.2.ffn"}
    raw["capacity_factors"] = factors
    config_file.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=str(config_file).replace(".", r"\.") + ": " + message):
        from_pretrained(tmp_path / "m")
