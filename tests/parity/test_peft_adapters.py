"""Our adapters in PEFT's format against PEFT itself, on transformers' DeepSeek-V2/V3 built from the same
tiny random checkpoint: PEFT loads ours and gives our logits; ours loads PEFT's and gives PEFT's."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_fixtures import input_ids, make_hf_model  # noqa: E402

from deepseek_moe.adapters import LoRAConfig, apply_lora, merge_lora  # noqa: E402
from deepseek_moe.adapters.peft import load_adapter, save_adapter  # noqa: E402
from deepseek_moe.io import load_pretrained  # noqa: E402

TOL = 1e-4
CASES = {
    "v2": ("deepseek_v2", dict(q_lora_rank=None, topk_method="greedy")),
    "v3": ("deepseek_v3", dict(q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True)),
}
# What PEFT can target on transformers 5's DeepSeek models (adapters/peft.py says why not the shared experts).
TARGETS = ("attention", "routed_experts", "head")


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(params=list(CASES))
def base(request, tmp_path):
    model_type, overrides = CASES[request.param]
    hf, seed = make_hf_model(model_type, **overrides)
    hf.save_pretrained(tmp_path / "base")
    return hf, tmp_path, seed


def test_peft_loads_our_adapter(base):
    hf, tmp, seed = base
    ours = load_pretrained(tmp / "base", dtype=torch.float32).eval()
    ids = input_ids(seed)
    plain = _logits(ours, ids)
    cfg = LoRAConfig(r=4, alpha=8.0, targets=TARGETS, init="random")
    torch.manual_seed(0)
    apply_lora(ours, cfg)
    ours_adapted = _logits(ours, ids)
    assert (ours_adapted - plain).abs().max() > 1e-3
    save_adapter(ours, tmp / "adapter", cfg)
    config = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    assert "model.layers.1.mlp.experts.gate_up_proj" in config["target_parameters"]
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp / "adapter")).eval()
    torch.testing.assert_close(_logits(peft_model, ids), ours_adapted, rtol=0, atol=TOL)

    # and the adapter read back into a fresh model of ours gives the same logits, unmerged and merged
    again = load_pretrained(tmp / "base", dtype=torch.float32).eval()
    load_adapter(again, tmp / "adapter")
    torch.testing.assert_close(_logits(again, ids), ours_adapted, rtol=0, atol=1e-6)
    merge_lora(again)
    torch.testing.assert_close(_logits(again, ids), ours_adapted, rtol=0, atol=TOL)


def test_peft_adapter_loads_into_ours(base):
    hf, tmp, seed = base
    ids = input_ids(seed)
    attention = sorted({n.rsplit(".", 1)[1] for n, m in hf.named_modules()
                        if ".self_attn." in n and isinstance(m, torch.nn.Linear)})
    lcfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=[*attention, "lm_head"],
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = peft.get_peft_model(hf, lcfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT zero-inits B; draw it so the adapter does something
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    expected = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp / "peft_adapter")
    ours = load_pretrained(tmp / "base", dtype=torch.float32).eval()
    plain = _logits(ours, ids)
    names = load_adapter(ours, tmp / "peft_adapter")
    assert "layers.1.ffn.experts" in names and "head" in names
    got = _logits(ours, ids)
    assert (got - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
