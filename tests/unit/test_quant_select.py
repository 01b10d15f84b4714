"""``from_pretrained(..., quantize=..., hooks=LoadHooks(select=...))`` keeps exactly what the unquantised load
keeps: the selected range of routed experts (``offset`` its first), nothing of what ``select`` leaves out (it
stays on meta, never read), and the kept experts' codes and scales equal those of the whole quantised model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deepseek_moe as dm
from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.io import LoadHooks, load_pretrained, save_pretrained
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.quant import QuantConfig, quantize_checkpoint


def select(name: str, expert: int | None) -> bool:
    if name.startswith("head.") or name.startswith("layers.2.ffn.experts."):
        return False
    return expert is None or not name.startswith("layers.1.") or 2 <= expert < 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    moe = MoEConfig(dim=64, moe_inter_dim=64, n_routed_experts=8, n_activated_experts=2, n_shared_experts=1)
    cfg = ModelConfig(vocab_size=64, dim=64, inter_dim=96, n_layers=3, n_dense_layers=1, n_heads=2, moe=moe,
                      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, max_seq_len=64,
                      original_seq_len=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qsel") / "float"
    save_pretrained(DeepSeekMoEForCausalLM(cfg), path)
    return path


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_select_keeps_what_the_unquantised_one_keeps(checkpoint: Path, tmp_path: Path, bits: int) -> None:
    plain = load_pretrained(checkpoint, hooks=LoadHooks(select=select))
    # Quantised while loading, and from a checkpoint stored quantised: the same model.
    stored = quantize_checkpoint(checkpoint, tmp_path / f"int{bits}", QuantConfig(bits=bits))
    whole = dm.from_pretrained(stored)
    for quantised in (dm.from_pretrained(checkpoint, quantize=f"int{bits}", hooks=LoadHooks(select=select)),
                      dm.from_pretrained(stored, hooks=LoadHooks(select=select))):
        for i in (1, 2):
            got, ref = quantised.layers[i].ffn.experts, plain.layers[i].ffn.experts
            assert (got.n_experts, got.offset) == (ref.n_experts, ref.offset)
        assert quantised.layers[2].ffn.experts.w1.device.type == "meta"
        assert quantised.head.qweight.device.type == "meta" and plain.head.weight.device.type == "meta"
        experts, full = quantised.layers[1].ffn.experts, whole.layers[1].ffn.experts
        assert (experts.n_experts, experts.offset) == (4, 2)
        for name in ("w1", "w2", "w3"):
            assert torch.equal(getattr(experts, name), getattr(full, name)[2:6]), name
            assert torch.equal(getattr(experts, f"{name}_scale"), getattr(full, f"{name}_scale")[2:6]), name
        # Everything else that was selected is loaded, and equals the whole model's.
        for name, t in quantised.state_dict().items():
            if name.startswith(("head.", "layers.2.ffn.experts.", "layers.1.ffn.experts.")):
                continue
            assert t.device.type == "cpu", name
            assert torch.equal(t, whole.state_dict()[name]), name


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("layout", ["deepseek", "deepseek_moe"])
def test_a_quantised_model_saves_in_the_layout_its_config_needs(tmp_path: Path, layout: str, bits: int) -> None:
    """The one writer stores a quantised model in any layout: DeepSeekMoE 16B's (MHA) and our own (MLA with
    split-halves RoPE, which transformers cannot express) included; it loads back quantised, logits equal."""
    from deepseek_moe.io import checkpoint_format
    from deepseek_moe.quant import quant_config_of, quantize_model

    attn: dict[str, object] = ({"attention": "mha", "kv_lora_rank": 0, "qk_nope_head_dim": 0, "qk_rope_head_dim": 32,
                                "v_head_dim": 32} if layout == "deepseek" else
                               {"kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16})
    moe = MoEConfig(dim=64, moe_inter_dim=64, n_routed_experts=4, n_activated_experts=2, n_shared_experts=1)
    cfg = ModelConfig(vocab_size=64, dim=64, inter_dim=96, n_layers=2, n_dense_layers=1, n_heads=2, moe=moe,
                      max_seq_len=64, original_seq_len=64, rope_interleave=False, **attn)  # type: ignore[arg-type]
    assert checkpoint_format(cfg) == layout
    torch.manual_seed(0)
    model = quantize_model(DeepSeekMoEForCausalLM(cfg).eval(), QuantConfig(bits=bits))
    save_pretrained(model, tmp_path / "q", max_shard_size="30KB")
    loaded = load_pretrained(tmp_path / "q")
    assert quant_config_of(loaded) == quant_config_of(model)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
