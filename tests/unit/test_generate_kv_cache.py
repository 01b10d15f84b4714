"""The KV cache object: growth keeps earlier slots, sizes count only filled slots; bf16 decoding runs."""

import torch
from test_model_configs import small_config

from deepseek_moe.infer.generate import generate
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.model.kv_cache import KVCache, LayerCache


def test_layer_cache_grows_past_its_capacity_without_losing_slots() -> None:
    cache = LayerCache()
    chunks = [(torch.randn(2, t, 3), torch.randn(2, t, 4, 5)) for t in (5, 1, 20, 1, 40)]
    for i, chunk in enumerate(chunks):
        a, b = cache.append(*chunk)
        torch.testing.assert_close(a, torch.cat([c[0] for c in chunks[: i + 1]], dim=1))
        torch.testing.assert_close(b, torch.cat([c[1] for c in chunks[: i + 1]], dim=1))
    assert cache.length == 67
    assert cache.numel() == 2 * 67 * (3 + 20)
    assert cache.nbytes() == cache.numel() * 4


def test_kv_cache_mask_and_bytes_per_token() -> None:
    cache = KVCache(n_layers=2)
    assert cache.seq_len == 0 and cache.bytes_per_token() == 0.0
    cache.extend_mask(torch.tensor([[False, True], [True, True]]))
    full = cache.extend_mask(torch.ones(2, 1, dtype=torch.bool))
    assert full.shape == (2, 3) and cache.seq_len == 3


def test_bfloat16_generation_runs_and_matches_float32_mostly() -> None:
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(small_config())
    ids = torch.randint(0, 64, (2, 6))
    reference = model(ids).logits
    low = model.to(torch.bfloat16)
    logits = low(ids).logits
    assert logits.dtype == torch.float32  # logits are returned in float32 for the loss
    torch.testing.assert_close(logits, reference, atol=0.05, rtol=0.05)
    out = generate(low, ids.tolist(), max_new_tokens=3)
    assert all(len(t) == 3 for t in out.new_tokens)
