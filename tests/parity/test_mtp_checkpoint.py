"""DeepSeek-V3's multi-token-prediction layer in checkpoints: a tiny V3 fixture with an MTP layer (layer index
num_hidden_layers, with copies of the embedding and head as V3 ships them) loads into ``model.mtp``, saves back
bit for bit, drafts what transformers' own MTP model (loaded by transformers from the same files) computes, and
``mtp=False`` skips it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from hf_fixtures import input_ids, make_hf_model, rewrite_config  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from deepseek_moe.io import CheckpointError, load_pretrained, save_pretrained  # noqa: E402

OVERRIDES: dict[str, Any] = dict(q_lora_rank=24, n_group=4, topk_group=2, num_experts_per_tok=3, norm_topk_prob=True)


def write_v3_with_mtp(path: Path, *, copies_equal: bool = True) -> tuple[Any, int]:
    """transformers' tiny random V3 saved to ``path``, plus one MTP layer at index n_layers: a random MoE block
    (layer 1's keys), random enorm/hnorm/eh_proj/shared_head.norm, and the embedding and head copied in."""
    hf_model, _ = make_hf_model("deepseek_v3", **OVERRIDES)
    hf_model.save_pretrained(path)
    n = hf_model.config.num_hidden_layers
    file = path / "model.safetensors"
    tensors = load_file(file)
    g = torch.Generator().manual_seed(7)
    prefix = f"model.layers.{n}."
    for key in [k for k in tensors if k.startswith("model.layers.1.")]:
        t = tensors[key]
        noise = torch.randn(t.shape, generator=g)
        value = 1 + 0.2 * noise if "norm" in key else 0.05 * noise if "bias" in key else noise / t.shape[-1] ** 0.5
        tensors[prefix + key.removeprefix("model.layers.1.")] = value.to(t.dtype)
    dim = hf_model.config.hidden_size
    tensors[prefix + "enorm.weight"] = 1 + 0.2 * torch.randn(dim, generator=g)
    tensors[prefix + "hnorm.weight"] = 1 + 0.2 * torch.randn(dim, generator=g)
    tensors[prefix + "shared_head.norm.weight"] = 1 + 0.2 * torch.randn(dim, generator=g)
    tensors[prefix + "eh_proj.weight"] = torch.randn(dim, 2 * dim, generator=g) / (2 * dim) ** 0.5
    tensors[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[prefix + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    if not copies_equal:
        tensors[prefix + "shared_head.head.weight"][0, 0] += 1.0
    save_file(tensors, file, metadata={"format": "pt"})
    rewrite_config(path, num_nextn_predict_layers=1)
    return hf_model, n


def test_v3_mtp_layer_round_trips_bit_for_bit(tmp_path: Path) -> None:
    src, dst = tmp_path / "v3", tmp_path / "ours"
    _, n = write_v3_with_mtp(src)
    model = load_pretrained(src)
    assert model.config.mtp_depth == 1 and len(model.mtp) == 1
    assert save_pretrained(model, dst) == "deepseek_v3"
    before, after = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
    assert sorted(after) == sorted(before)
    assert any(k.startswith(f"model.layers.{n}.mlp.experts.") for k in after)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
    assert json.loads((dst / "config.json").read_text())["num_nextn_predict_layers"] == 1
    # the module's tensors went where the names say (a swap of two same-shaped norms would not round-trip
    # unnoticed through the shared mapping alone, so look at two directly)
    torch.testing.assert_close(model.mtp[0].norm.weight, before[f"model.layers.{n}.shared_head.norm.weight"])
    torch.testing.assert_close(model.mtp[0].block.attn_norm.weight, before[f"model.layers.{n}.input_layernorm.weight"])


def test_mtp_false_skips_the_layer(tmp_path: Path) -> None:
    src, dst = tmp_path / "v3", tmp_path / "ours"
    _, n = write_v3_with_mtp(src)
    full, lean = load_pretrained(src), load_pretrained(src, mtp=False)
    assert lean.config.mtp_depth == 0 and len(lean.mtp) == 0
    assert not any(k.startswith("mtp.") for k in lean.state_dict())
    saved = sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in lean.parameters())
    assert saved == sum(p.numel() for p in full.mtp.parameters()) > 0
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(full(ids).logits, lean(ids).logits)
    save_pretrained(lean, dst)
    assert not any(k.startswith(f"model.layers.{n}.") for k in load_file(dst / "model.safetensors"))
    assert json.loads((dst / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_drafts_match_transformers_mtp_model(tmp_path: Path) -> None:
    """transformers' MtpModel, loaded by transformers' own code from the same files, and our mtp_forward give
    the same hidden states and draft logits for the same main-model hidden states."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    src = tmp_path / "v3"
    _, n = write_v3_with_mtp(src)
    hf_main = DeepseekV3ForCausalLM.from_pretrained(src, attn_implementation="eager",
                                                    experts_implementation="eager").eval()
    # transformers finds MTP weights through the main class's ignore pattern, which names V3's layer 61
    hf_main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n}\..*"]
    hf_mtp = MtpModel.from_pretrained(hf_main).eval()
    ours = load_pretrained(src)
    ids = input_ids()
    T = ids.shape[1]
    with torch.no_grad():
        hidden = hf_main(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
        torch.testing.assert_close(ours(ids).hidden, hidden, rtol=1e-4, atol=1e-4)
        positions = torch.arange(1, T)[None].expand(ids.shape[0], -1)
        theirs_h = hf_mtp.forward_layer(0, hidden[:, :-1], positions, None, input_ids=ids[:, 1:])
        theirs = hf_mtp._project_to_logits(theirs_h)
        got = ours.mtp_forward(1, hidden[:, :-1], ids[:, 1:])
    torch.testing.assert_close(got.hidden, theirs_h, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.logits, theirs.float(), rtol=1e-4, atol=1e-4)


def test_differing_copies_of_the_shared_head_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "v3"
    _, n = write_v3_with_mtp(src, copies_equal=False)
    with pytest.raises(CheckpointError, match=rf"model\.layers\.{n}\.shared_head\.head\.weight' differs from "
                                              r"'lm_head\.weight'.*mtp=False"):
        load_pretrained(src)
    assert load_pretrained(src, mtp=False).config.mtp_depth == 0


def test_config_naming_an_mtp_layer_the_files_lack_loads_without_it(tmp_path: Path) -> None:
    hf_model, _ = make_hf_model("deepseek_v3", **OVERRIDES)
    hf_model.save_pretrained(tmp_path)
    rewrite_config(tmp_path, num_nextn_predict_layers=1)
    with pytest.warns(UserWarning, match="num_nextn_predict_layers = 1 but the checkpoint holds no"):
        model = load_pretrained(tmp_path)
    assert model.config.mtp_depth == 0


def test_fp8_mtp_layer_is_dequantised_with_its_scales(tmp_path: Path) -> None:
    """V3 ships its MTP layer block-quantised like the rest (FP8 + weight_scale_inv): read through the same path."""
    pytest.importorskip("accelerate")
    from test_fp8 import to_fp8_checkpoint

    src = tmp_path / "v3"
    _, n = write_v3_with_mtp(src)
    quantised = to_fp8_checkpoint(src, (16, 16))
    assert f"model.layers.{n}.eh_proj.weight" in quantised
    # V3 keeps its output heads in bf16 (§3.3.1), the MTP layer's copy too: undo the fixture's FP8 of the copy
    tensors = load_file(src / "model.safetensors")
    head = f"model.layers.{n}.shared_head.head.weight"
    tensors.pop(head + "_scale_inv")
    tensors[head] = tensors["lm_head.weight"].clone()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    model = load_pretrained(src, dtype=torch.float32)
    stored = load_file(src / "model.safetensors")

    def dequantised(key: str) -> torch.Tensor:
        scale = stored[key + "_scale_inv"].repeat_interleave(16, 0).repeat_interleave(16, 1)
        q = stored[key].float()
        return q * scale[:q.shape[0], :q.shape[1]]

    torch.testing.assert_close(model.mtp[0].eh_proj.weight, dequantised(f"model.layers.{n}.eh_proj.weight"))
    torch.testing.assert_close(model.mtp[0].block.ffn.experts.w2[3],
                               dequantised(f"model.layers.{n}.mlp.experts.3.down_proj.weight"))
