"""MLA: the absorbed and naive cached paths equal the uncached forward; the cache holds only the latent."""

import pytest
import torch
from test_model_configs import small_config

from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.model.kv_cache import KVCache


def _incremental_logits(model: DeepSeekMoEForCausalLM, ids: torch.Tensor, prefill: int,
                        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
    cache = model.new_cache()
    part = None if mask is None else mask[:, :prefill]
    outs = [model(ids[:, :prefill], attention_mask=part, cache=cache).logits]
    for t in range(prefill, ids.shape[1]):
        part = None if mask is None else mask[:, t:t + 1]
        outs.append(model(ids[:, t:t + 1], attention_mask=part, cache=cache).logits)
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("attention", ["mla", "mha"])
@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_prefill_and_decode_equal_full_forward(attention: str, attn_impl: str, q_lora_rank: int) -> None:
    torch.manual_seed(0)
    cfg = small_config(attention=attention, attn_impl=attn_impl, q_lora_rank=q_lora_rank)
    model = DeepSeekMoEForCausalLM(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    full = model(ids).logits
    incremental, _ = _incremental_logits(model, ids, prefill=6)
    torch.testing.assert_close(incremental, full, rtol=1e-9, atol=1e-9)


def test_absorb_equals_naive_with_left_padding() -> None:
    torch.manual_seed(1)
    cfg = small_config()
    model = DeepSeekMoEForCausalLM(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :1] = 0
    results = {}
    for impl in ("absorb", "naive"):
        for layer in model.layers:
            layer.attn.attn_impl = impl
        results[impl], _ = _incremental_logits(model, ids, prefill=5, mask=mask)
    torch.testing.assert_close(results["absorb"], results["naive"], rtol=1e-9, atol=1e-9)
    full = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(results["absorb"][mask.bool()], full[mask.bool()], rtol=1e-9, atol=1e-9)
    assert torch.isfinite(full).all()  # padding queries see themselves, so no NaN leaks


def test_left_padding_does_not_change_a_row() -> None:
    torch.manual_seed(2)
    cfg = small_config()
    model = DeepSeekMoEForCausalLM(cfg).double().eval()
    ids = torch.randint(1, cfg.vocab_size, (1, 7))
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), ids), dim=1)
    mask = torch.cat((torch.zeros(1, 3), torch.ones(1, 7)), dim=1)
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 3:], model(ids).logits)


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_cache_holds_the_expected_elements(attention: str) -> None:
    cfg = small_config(attention=attention)
    model = DeepSeekMoEForCausalLM(cfg).eval()
    _, cache = _incremental_logits(model, torch.randint(0, cfg.vocab_size, (2, 5)), prefill=3)
    per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim if attention == "mla"
                 else cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim))
    assert sum(layer.numel() for layer in cache.layers) == 2 * 5 * cfg.n_layers * per_layer
    assert cache.bytes_per_token() == cfg.n_layers * per_layer * 4


def test_mha_whole_head_rotary() -> None:
    """DeepSeekMoE 16B's LLaMA-style heads: no position-free part, RoPE on split halves."""
    torch.manual_seed(3)
    cfg = small_config(attention="mha", kv_lora_rank=0, qk_nope_head_dim=0, qk_rope_head_dim=8,
                       rope_interleave=False, rope_factor=1.0)
    model = DeepSeekMoEForCausalLM(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    incremental, _ = _incremental_logits(model, ids, prefill=4)
    torch.testing.assert_close(incremental, model(ids).logits, rtol=1e-9, atol=1e-9)
