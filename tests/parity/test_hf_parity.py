"""Logits parity with transformers' DeepSeek-V2/V3 on tiny random checkpoints, both directions.

For each case: transformers model (every tensor random, routing margins > 1e-4) -> save_pretrained ->
our load_pretrained -> same logits; our save_pretrained -> transformers from_pretrained -> same logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from hf_fixtures import YARN, hf_classes, input_ids, make_hf_model, rewrite_config, to_published_rope  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from deepseek_moe.io import load_pretrained, save_pretrained  # noqa: E402

TOL = 1e-4

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "v2_greedy": ("deepseek_v2", dict(q_lora_rank=None, topk_method="greedy", routed_scaling_factor=1.5)),
    "v2_group_limited": ("deepseek_v2", dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                                             topk_group=2, num_experts_per_tok=3, routed_scaling_factor=16.0)),
    "v3_grouped": ("deepseek_v3", dict(q_lora_rank=24, n_group=4, topk_group=2, num_experts_per_tok=3,
                                       norm_topk_prob=True, routed_scaling_factor=2.5)),
    "v3_no_qlora_split_halves": ("deepseek_v3", dict(q_lora_rank=None, n_group=2, topk_group=1,
                                                     rope_interleave=False, norm_topk_prob=False)),
    "v2_yarn_published_config": ("deepseek_v2", dict(q_lora_rank=24, topk_method="greedy", rope_parameters=YARN)),
    "v3_yarn": ("deepseek_v3", dict(q_lora_rank=None, n_group=4, topk_group=2, rope_parameters=YARN)),
    "v3_tied": ("deepseek_v3", dict(q_lora_rank=24, n_group=4, topk_group=2, tie_word_embeddings=True)),
    "v2_tied": ("deepseek_v2", dict(q_lora_rank=None, n_shared_experts=1, tie_word_embeddings=True)),
    "v3_yarn_mscale_differs": ("deepseek_v3", dict(q_lora_rank=24, n_group=2, topk_group=1, rope_parameters={
        **YARN, "mscale": 1.0, "mscale_all_dim": 0.707})),
    "v2_no_shared_experts": ("deepseek_v2", dict(q_lora_rank=None, n_shared_experts=0)),
    "v3_sharded": ("deepseek_v3", dict(q_lora_rank=24, n_group=4, topk_group=2)),
    "v3_mtp_layer": ("deepseek_v3", dict(q_lora_rank=24, n_group=4, topk_group=2)),
    # biases on q_a_proj, kv_a_proj_with_mqa and o_proj (never q_proj, q_b_proj or kv_b_proj)
    "v3_attention_bias": ("deepseek_v3", dict(q_lora_rank=24, n_group=4, topk_group=2, attention_bias=True)),
    "v2_attention_bias_no_qlora": ("deepseek_v2", dict(q_lora_rank=None, attention_bias=True)),
}

MAX_DIFFS: dict[str, float] = {}  # printed by the last test, for the record


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _add_mtp_layer(path: Path, n_layers: int) -> None:
    """Append a DeepSeek-V3 multi-token-prediction module's tensors (layer index == num_hidden_layers)."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    prefix = f"model.layers.{n_layers}."
    for key in [k for k in tensors if k.startswith("model.layers.1.")]:
        tensors[prefix + key.removeprefix("model.layers.1.")] = torch.randn_like(tensors[key])
    for name, shape in {"enorm.weight": (32,), "hnorm.weight": (32,), "eh_proj.weight": (32, 64),
                        "shared_head.norm.weight": (32,), "shared_head.head.weight": (96, 32),
                        "embed_tokens.weight": (96, 32)}.items():
        tensors[prefix + name] = torch.randn(shape)
    save_file(tensors, file, metadata={"format": "pt"})
    rewrite_config(path, num_nextn_predict_layers=1)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_both_ways(case: str, tmp_path: Path) -> None:
    model_type, overrides = CASES[case]
    hf_model, seed = make_hf_model(model_type, **overrides)
    ids = input_ids()
    expected = _logits(hf_model, ids)

    src = tmp_path / "hf"
    hf_model.save_pretrained(src, max_shard_size="20KB" if case == "v3_sharded" else "5GB")
    if case == "v3_sharded":
        assert (src / "model.safetensors.index.json").is_file()
    if case == "v2_yarn_published_config":
        to_published_rope(src)
        assert "rope_scaling" in json.loads((src / "config.json").read_text())
    if case == "v3_mtp_layer":
        _add_mtp_layer(src, hf_model.config.num_hidden_layers)

    # the MTP layer skipped (mtp=False) is what this case checks; loading it: test_mtp_checkpoint.py
    ours = load_pretrained(src, mtp=case != "v3_mtp_layer")
    got = _logits(ours, ids)
    diff = (got - expected).abs().max().item()
    MAX_DIFFS[f"{case} hf->ours"] = diff
    assert diff <= TOL, f"{case}: max |ours - transformers| = {diff:.3g} (seed {seed})"

    dst = tmp_path / "ours"
    save_pretrained(ours, dst, max_shard_size="16KB" if case == "v3_sharded" else "5GB")
    if case == "v3_sharded":
        assert len(json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    if overrides.get("tie_word_embeddings"):
        assert "lm_head.weight" not in load_file(dst / "model.safetensors")
    _, model_cls = hf_classes(model_type)
    hf_back, info = model_cls.from_pretrained(dst, attn_implementation="eager", experts_implementation="eager",
                                              output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    back = _logits(hf_back.eval(), ids)
    diff_back = (back - expected).abs().max().item()
    MAX_DIFFS[f"{case} ours->hf"] = diff_back
    assert diff_back <= TOL, f"{case}: after our save_pretrained, max diff {diff_back:.3g}"

    again = _logits(load_pretrained(dst), ids)
    assert torch.equal(again, got), f"{case}: our own save/load round trip changed the logits"


@pytest.mark.parametrize("case", ["v2_group_limited", "v3_yarn"])
@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_cached_decode_matches_transformers(case: str, attn_impl: str, tmp_path: Path) -> None:
    """Prefill half the sequence, then one token at a time through our latent cache: transformers' logits."""
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

    model_type, overrides = CASES[case]
    hf_model, _ = make_hf_model(model_type, **overrides)
    hf_model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    ours = DeepSeekMoEForCausalLM(loaded.config.replace(attn_impl=attn_impl)).eval()
    ours.load_state_dict(loaded.state_dict())
    ids = input_ids()
    expected = _logits(hf_model, ids)
    cache = ours.new_cache()
    half = ids.shape[1] // 2
    with torch.no_grad():
        steps = [ours(ids[:, :half], cache=cache).logits]
        steps += [ours(ids[:, t:t + 1], cache=cache).logits for t in range(half, ids.shape[1])]
    diff = (torch.cat(steps, dim=1) - expected).abs().max().item()
    MAX_DIFFS[f"{case} cached decode ({attn_impl})"] = diff
    assert diff <= TOL


def test_fused_expert_checkpoint_loads(tmp_path: Path) -> None:
    """A checkpoint holding transformers' in-memory layout (gate_up_proj / down_proj stacks) loads too."""
    hf_model, _ = make_hf_model("deepseek_v3", q_lora_rank=None, n_group=4, topk_group=2)
    hf_model.save_pretrained(tmp_path)
    tensors = {k: v.clone() for k, v in hf_model.state_dict().items() if "rotary_emb" not in k}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in tensors)
    ids = input_ids()
    diff = (_logits(load_pretrained(tmp_path), ids) - _logits(hf_model, ids)).abs().max().item()
    assert diff <= TOL


def test_bf16_load_keeps_rope_and_bias_fp32(tmp_path: Path) -> None:
    hf_model, _ = make_hf_model("deepseek_v3", q_lora_rank=None, n_group=4, topk_group=2)
    hf_model.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert ours.embed.weight.dtype == torch.bfloat16
    assert ours.layers[1].ffn.gate.e_score_correction_bias.dtype == torch.float32
    assert ours.rope.inv_freq.dtype == torch.float32
    got, expected = _logits(ours, input_ids()), _logits(hf_model, input_ids())
    assert torch.isfinite(got).all() and (got - expected).abs().mean() < 0.1


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    hf_model, _ = make_hf_model("deepseek_v2", q_lora_rank=None)
    hf_model.save_pretrained(tmp_path / "a")
    ours = load_pretrained(tmp_path / "a")
    assert ours.tokenizer is None
    ours.tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    save_pretrained(ours, tmp_path / "b")
    again = load_pretrained(tmp_path / "b")
    assert again.tokenizer is not None and again.tokenizer.token_to_id("hello") == 1


def test_zz_report_max_diffs() -> None:
    for name, diff in sorted(MAX_DIFFS.items()):
        print(f"{name:40s} {diff:.3e}")
