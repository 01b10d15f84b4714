"""Checkpoints and configs that must be refused, each with an error naming the file, the key and the rule."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.io import CheckpointError, config_from_hf, config_to_hf, load_pretrained, save_pretrained
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

# A complete config.json as transformers 5 writes it for a tiny DeepSeek-V3.
V3: dict[str, Any] = {
    "model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
    "moe_intermediate_size": 16, "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 2,
    "num_key_value_heads": 2, "q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 8, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}
V2 = {**V3, "model_type": "deepseek_v2", "topk_method": "greedy", "norm_topk_prob": False}


def _checkpoint(tmp_path: Path, hf: dict[str, Any] = V3) -> Path:
    """Our model saved as a Hugging Face checkpoint (no transformers needed)."""
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(config_from_hf(hf))
    save_pretrained(model, tmp_path)
    return tmp_path


def _edit_tensors(path: Path, edit: Any) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_key_is_named(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    _edit_tensors(path, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=re.escape("'model.layers.1.mlp.experts.3.up_proj.weight'")):
        load_pretrained(path)


def test_missing_lm_head_without_tying_is_an_error(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    _edit_tensors(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="missing tensor.*'lm_head.weight'"):
        load_pretrained(path)


def test_misshaped_tensor_names_key_and_both_shapes(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    _edit_tensors(path, lambda t: t.__setitem__(key, torch.zeros(31, 16)))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    message = str(err.value)
    assert key in message and "(31, 16)" in message and "(32, 16)" in message and "model.safetensors" in message


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    _edit_tensors(path, lambda t: t.__setitem__("model.layers.0.self_attn.q_a_proj.weight", torch.zeros(4, 32)))
    with pytest.raises(CheckpointError, match=re.escape("'model.layers.0.self_attn.q_a_proj.weight'")):
        load_pretrained(path)


def test_fp8_scale_without_fp8_config_is_refused(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    _edit_tensors(path, lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.weight_scale_inv", torch.ones(1)))
    with pytest.raises(CheckpointError, match="'model.layers.0.self_attn.o_proj.weight_scale_inv'.*FP8.*fp8"):
        load_pretrained(path)


@pytest.mark.parametrize(("quant", "pattern"), [
    ({"quant_method": "gptq"}, "quant_method 'gptq' is not supported"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt.*'e5m2'"),
    ({"quant_method": "fp8"}, "weight_block_size"),
])
def test_unreadable_quantization_config_is_refused(quant: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match="ckpt/config.json: .*" + pattern):
        config_from_hf({**V3, "quantization_config": quant}, source="ckpt/config.json")


def test_no_weights_file(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        load_pretrained(path)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_pretrained(DeepSeekMoEForCausalLM(config_from_hf(V3)), tmp_path, max_shard_size="8KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=re.escape(shards[1].name)):
        load_pretrained(tmp_path)


@pytest.mark.parametrize(("changes", "pattern"), [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"model_type": "deepseek_v2", "scoring_func": "sigmoid"}, "scoring_func.*contradicts.*deepseek_v2"),
    ({"scoring_func": "softmax"}, "scoring_func.*contradicts.*deepseek_v3"),
    ({"topk_method": "greedy"}, "topk_method.*contradicts.*deepseek_v3"),
    ({"model_type": "deepseek_v2", "topk_method": "noaux_tc"}, "topk_method.*contradicts.*deepseek_v2"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic' is not supported"),
    ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling.rope_type 'linear' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 1}, "num_key_value_heads"),
    ({"vocab_size": None}, "missing key.*vocab_size"),
])
def test_bad_config_is_refused_naming_the_key(changes: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        config_from_hf({**V3, **changes}, source="ckpt/config.json")
    with pytest.raises(ValueError, match="ckpt/config.json"):
        config_from_hf({**V3, **changes}, source="ckpt/config.json")


def test_wrong_model_type_in_checkpoint_names_the_file(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, "model_type": "mixtral"}))
    with pytest.raises(ValueError, match=re.escape(str(path / "config.json")) + ".*'mixtral'"):
        load_pretrained(path)


def _tiny(**changes: Any) -> ModelConfig:
    moe = MoEConfig(dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2,
                    **changes.pop("moe", {}))
    return ModelConfig(vocab_size=64, dim=32, inter_dim=48, n_layers=2, n_dense_layers=1, n_heads=2, moe=moe,
                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, **changes)


@pytest.mark.parametrize(("cfg", "pattern"), [
    (_tiny(attention="mha"), "attention='mha'"),
    (_tiny(moe={"use_routing_bias": True}), "use_routing_bias=True with score_func='softmax'"),
    (_tiny(moe={"norm_topk_prob": True}), "norm_topk_prob=True with score_func='softmax'"),
    (_tiny(rope_interleave=False), "rope_interleave=False"),
    (_tiny(moe={"score_func": "sigmoid", "n_expert_groups": 4, "n_limited_groups": 2}), "group_score_func='max'"),
])
def test_config_transformers_cannot_express_is_saved_in_our_format(cfg: ModelConfig, pattern: str,
                                                                      tmp_path: Path) -> None:
    """config_to_hf refuses it, naming the rule; save_pretrained writes our own format, which loads back exactly."""
    with pytest.raises(ValueError, match="cannot express " + pattern):
        config_to_hf(cfg)
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(cfg).eval()
    assert save_pretrained(model, tmp_path / "out") == "deepseek_moe"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["format"] == "deepseek_moe"
    loaded = load_pretrained(tmp_path / "out")
    assert loaded.config == cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_expert_index_out_of_range_is_named(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    key = "model.layers.1.mlp.experts.8.gate_proj.weight"
    _edit_tensors(path, lambda t: t.__setitem__(key, torch.zeros(16, 32)))
    with pytest.raises(CheckpointError, match=re.escape(repr(key)) + ".*expert 8 out of range for 8"):
        load_pretrained(path)


def test_index_pointing_at_wrong_shard_is_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_pretrained(DeepSeekMoEForCausalLM(config_from_hf(V3)), tmp_path, max_shard_size="8KB")
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    current = index["weight_map"]["model.norm.weight"]
    first = next(p.name for p in sorted(tmp_path.glob("model-*.safetensors")) if p.name != current)
    index["weight_map"]["model.norm.weight"] = first
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="maps 'model.norm.weight' to " + re.escape(first)):
        load_pretrained(tmp_path)


def test_config_rule_violation_names_the_file() -> None:
    with pytest.raises(ValueError, match=r"^ckpt/config.json: .*experts per group"):
        config_from_hf({**V3, "n_group": 8}, source="ckpt/config.json")
