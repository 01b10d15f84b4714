"""DeepSeekMoE 16B's own layout (``model_type: "deepseek"``): our loader and saver against an independent
reference made of transformers' Llama modules and our per-token MoE reference (deepseek16b_reference.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from deepseek16b_reference import ReferenceDeepseek, randomise  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from deepseek_moe.io import checkpoint_format, config_from_hf, load_pretrained, save_pretrained  # noqa: E402
from deepseek_moe.io.hf_deepseek import config_to_deepseek  # noqa: E402
from deepseek_moe.presets import deepseek_moe_2b, deepseek_moe_16b  # noqa: E402

TOL = 1e-4
MARGIN = 1e-4

# deepseek-moe-16b-base's config.json at toy widths (the keys and their meaning as published).
CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "attention_bias": False,
    "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
    "intermediate_size": 48, "max_position_embeddings": 128, "moe_intermediate_size": 16, "moe_layer_freq": 1,
    "n_routed_experts": 8, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 4,
    "num_experts_per_tok": 3, "num_hidden_layers": 3, "num_key_value_heads": 4, "pretraining_tp": 1,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True, "vocab_size": 96,
}
CASES = {
    "published": {},
    "bias_normalised_no_shared": {"attention_bias": True, "norm_topk_prob": True, "n_shared_experts": None,
                                  "rope_theta": 50000.0, "first_k_dense_replace": 0},
}


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(7))


def _reference(hf: dict[str, Any]) -> ReferenceDeepseek:
    for seed in range(30):
        torch.manual_seed(seed)
        model = ReferenceDeepseek(hf).eval()
        randomise(model, torch.Generator().manual_seed(seed))
        if model.routing_margin(_ids()) > MARGIN:
            return model
    raise AssertionError("no seed gives routing margins > 1e-4")


@pytest.mark.parametrize("case", list(CASES))
def test_deepseek_layout_loads_and_saves_against_reference(case: str, tmp_path: Path) -> None:
    hf = {**CONFIG, **CASES[case]}
    reference = _reference(hf)
    src = tmp_path / "published"
    src.mkdir()
    state = {k: v for k, v in reference.state_dict().items() if "rotary_emb" not in k}
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(hf))
    expected = reference(_ids())

    ours = load_pretrained(src)
    assert ours.config.attention == "mha" and ours.config.attention_bias == hf["attention_bias"]
    with torch.no_grad():
        got = ours(_ids()).logits
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, f"{case}: max |ours - reference| = {diff:.3g}"

    dst = tmp_path / "ours"
    assert save_pretrained(ours, dst) == "deepseek"
    written = load_file(dst / "model.safetensors")
    assert set(written) == set(state), set(written) ^ set(state)
    back = ReferenceDeepseek(json.loads((dst / "config.json").read_text())).eval()
    missing, unexpected = back.load_state_dict(written, strict=False)  # strict but for the rotary buffer
    assert not unexpected and all("rotary_emb" in k for k in missing)
    diff_back = (back(_ids()) - expected).abs().max().item()
    assert diff_back <= TOL, f"{case}: reference on our saved checkpoint differs by {diff_back:.3g}"
    written_cfg = json.loads((dst / "config.json").read_text())
    for key, value in hf.items():
        if key not in ("torch_dtype",):
            assert written_cfg.get(key) == value or (key == "rope_theta" and written_cfg[key] == float(value)), key


@pytest.mark.parametrize("preset", [deepseek_moe_2b, deepseek_moe_16b])
def test_mha_presets_round_trip_through_the_16b_format(preset: Any) -> None:
    cfg = preset()
    assert checkpoint_format(cfg) == "deepseek"
    hf = config_to_deepseek(cfg)
    assert config_from_hf(hf) == cfg
