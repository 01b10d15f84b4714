"""from_pretrained(BASE, adapters=[...]) applies adapters unmerged; ``deepseek-moe merge`` writes BASE's layout
with the adapter folded in; an adapter round-trips through PEFT's format on every group."""

import json

import pytest
import torch
from test_adapters_lora import ids, small_model

from deepseek_moe import from_pretrained, save_pretrained
from deepseek_moe.adapters import GROUPS, LoRAConfig, apply_lora
from deepseek_moe.adapters.peft import load_adapter, save_adapter
from deepseek_moe.cli.main import main


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.fixture
def base_and_adapter(tmp_path):
    model = small_model()
    save_pretrained(model, tmp_path / "base")
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    cfg = LoRAConfig(r=3, alpha=5.0, targets=GROUPS, init="random")
    apply_lora(model, cfg)
    save_adapter(model, tmp_path / "adapter", cfg)
    return tmp_path, _logits(model, ids())


def test_adapters_apply_unmerged_on_load(base_and_adapter):
    tmp, expected = base_and_adapter
    model = from_pretrained(tmp / "base", adapters=[tmp / "adapter"])
    assert any("lora_A" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model, ids()), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        load_adapter(model, tmp / "adapter")


def test_merge_command_writes_the_base_layout(base_and_adapter, capsys):
    tmp, expected = base_and_adapter
    assert main(["merge", str(tmp / "base"), str(tmp / "adapter"), str(tmp / "merged")]) == 0
    base_cfg = json.loads((tmp / "base" / "config.json").read_text())
    merged_cfg = json.loads((tmp / "merged" / "config.json").read_text())
    assert merged_cfg == base_cfg
    assert (tmp / "merged" / "tokenizer_config.json").read_text() == (tmp / "base" / "tokenizer_config.json").read_text()
    merged = from_pretrained(tmp / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids()), expected, rtol=0, atol=1e-5)


def test_merge_refuses_a_bad_adapter(tmp_path, capsys):
    save_pretrained(small_model(), tmp_path / "base")
    (tmp_path / "adapter").mkdir()
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    other = small_model(n_layers=2)
    apply_lora(other, LoRAConfig(r=2, targets=("wkv_b",)))
    save_adapter(other, tmp_path / "wide", LoRAConfig(r=2))
    bigger = small_model(kv_lora_rank=24)
    save_pretrained(bigger, tmp_path / "base2")
    assert main(["merge", str(tmp_path / "base2"), str(tmp_path / "wide"), str(tmp_path / "out")]) == 2
    assert "lora_A" in capsys.readouterr().err
