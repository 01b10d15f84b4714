"""A quantised MLA layer's decode step as one C++ call (kernels/mla_one_token.py, qgemm.cpp dsm_mla_one_token)
against the same layer with the call off (its projections, then the prepare and attention calls) and under
``reference_paths()`` (plain PyTorch): a short prefill, decode steps and a verification, with left padding in one
row, q-LoRA and a direct wq, every kernel path this CPU runs, both kinds of activations."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deepseek_moe.model import mla as mla_module
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.presets import tiny
from deepseek_moe.quant import QuantConfig, quantize_model
from tests.unit.quant_kernel_paths import assert_call_matches, kernel_path, served_calls


@pytest.fixture(autouse=True)
def _the_layers_own_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are of the layer's own call: a whole block's call (test_block_one_token.py), which takes an
    unpadded step first, is off."""
    from deepseek_moe.model.block import Block

    monkeypatch.setattr(Block, "_one_call", lambda self, *args: None)


def quantised_tiny(bits: int, q_lora_rank: int, interleave: bool = True) -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny(), q_lora_rank=q_lora_rank, rope_interleave=interleave, n_layers=2)
    return quantize_model(DeepSeekMoEForCausalLM(cfg).eval(), QuantConfig(bits=bits))


def decode(model: DeepSeekMoEForCausalLM) -> torch.Tensor:
    """Logits of a left-padded batch of 2: a prefill of 5, three decode steps, a verification of 3."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, model.config.vocab_size, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :2] = 0  # row 0 starts with two padding tokens
    cache = model.new_cache()
    outs, done = [], 0
    for T in (5, 1, 1, 1, 3):
        outs.append(model(ids[:, done:done + T], attention_mask=mask[:, done:done + T], cache=cache).logits)
        done += T
    return torch.cat(outs, dim=1)


def without_call(model: DeepSeekMoEForCausalLM, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(mla_module.MLA, "_one_call_applies", lambda self, cache, x: False)
        return decode(model)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vnni"])
@pytest.mark.parametrize("activations", ["fp32", "int8"])
@pytest.mark.parametrize("bits,q_lora_rank", [(8, 0), (8, 48), (4, 64)])
def test_one_call_equals_the_layer(isa: str, activations: str, bits: int, q_lora_rank: int,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantised_tiny(bits, q_lora_rank, interleave=q_lora_rank != 48)  # 48: the halves layout of rotary pairs
    calls = served_calls(monkeypatch, mla_module, "mla_one_token")
    # every layer of every step, the prefill of 5 included
    assert_call_matches(lambda: decode(model), lambda: without_call(model, monkeypatch), calls, 2 * 5, isa,
                        activations)


def test_declines_adapters_hooks_and_rolls_the_cache_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepseek_moe.adapters.config import LoRAConfig
    from deepseek_moe.adapters.lora import QuantLoRALinear

    model = quantised_tiny(8, 48)
    with torch.inference_mode():
        want = decode(model)
    calls = served_calls(monkeypatch, mla_module, "mla_one_token")
    attn = model.layers[1].attn
    handle = attn.wo.register_forward_hook(lambda *a: None)
    with torch.inference_mode():
        torch.testing.assert_close(decode(model), want, rtol=1e-5, atol=1e-5)
    handle.remove()
    assert calls == [True] * 5, calls  # layer 1 took the plain path at every step
    calls.clear()
    base = attn.wq_b
    attn.wq_b = QuantLoRALinear(base, LoRAConfig(r=2, alpha=4.0, init="random"))
    try:
        with torch.inference_mode():
            got = decode(model)
            plain = without_call(model, monkeypatch)
    finally:
        attn.wq_b = base
    assert calls == [True] * 5, calls  # the adapted layer took its modules' path
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, want, atol=1e-3)  # the adapter's term is there
    calls.clear()
    with monkeypatch.context() as m:  # the kernel declines after the cache grew: rolled back, the plain path runs
        m.setattr(mla_module, "mla_one_token", lambda *a, **k: None)
        with torch.inference_mode():
            torch.testing.assert_close(decode(model), want, rtol=1e-5, atol=1e-5)


def test_a_projection_that_does_not_fit_is_named_and_the_cache_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantised_tiny(8, 48)
    attn = model.layers[0].attn
    cache = model.new_cache()
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]), cache=cache)
        monkeypatch.setattr(attn.wo, "qweight", attn.wo.qweight[:, :-1].contiguous())
        length = cache.layers[0].length
        with pytest.raises(ValueError, match="mla_one_token: wo codes"):
            model(torch.tensor([[8]]), cache=cache)
    assert cache.layers[0].length == length


def test_unpadded_steps_and_one_rotary_table_for_every_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """No mask (causal among a verification's new tokens) through the call, against the layer with it off; and an
    MLA layer given one (1, T, R/2) rotary table for a batch of 2, which the plain path broadcasts."""
    from deepseek_moe.model.kv_cache import LayerCache
    from deepseek_moe.model.rope import RotaryEmbedding

    model = quantised_tiny(8, 48)
    calls = served_calls(monkeypatch, mla_module, "mla_one_token")
    ids = torch.randint(1, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))

    def steps() -> torch.Tensor:
        cache = model.new_cache()
        return torch.cat([model(ids[:, a:b], cache=cache).logits for a, b in ((0, 4), (4, 5), (5, 6), (6, 9))], 1)

    with torch.inference_mode():
        got = steps()
        assert calls and all(calls)
        with monkeypatch.context() as m:
            m.setattr(mla_module.MLA, "_one_call_applies", lambda self, cache, x: False)
            torch.testing.assert_close(got, steps(), rtol=1e-5, atol=1e-5)
        attn = model.layers[0].attn
        cos, sin = RotaryEmbedding(model.config)(torch.arange(3)[None])  # (1, 3, R/2) for both rows
        x = torch.randn(2, 3, model.config.dim)
        outs = []
        for on in (True, False):
            with monkeypatch.context() as m:
                if not on:
                    m.setattr(mla_module.MLA, "_one_call_applies", lambda self, c, x: False)
                    m.setattr(mla_module.MLA, "_prepares_in_cpp", lambda self, c, k: False)
                outs.append(attn(x, cos, sin, None, LayerCache()))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_mla_one_token_names_what_does_not_fit() -> None:
    from deepseek_moe.kernels.mla_one_token import mla_one_token

    model = quantised_tiny(8, 48)
    attn = model.layers[0].attn
    codes = {n: getattr(attn, n).plain_codes() for n in ("wq_a", "wq_b", "wkv_a", "wo")}
    H, N, R, C, V = 4, 32, 16, 64, 32
    x, cs = torch.randn(1, 1, 256), torch.randn(1, 1, R // 2)
    kv, pe = torch.zeros(1, 1, C), torch.zeros(1, 1, R)
    w_uk, w_uv_t = torch.randn(H, N, C), torch.randn(H, C, V)
    norms = ((attn.q_norm.weight, 1e-6), (attn.kv_norm.weight, 1e-6))
    with torch.inference_mode():
        bad_scale = {**codes, "wo": (codes["wo"][0], codes["wo"][1].half())}
        with pytest.raises(ValueError, match="wo codes .*fp32 scales a row"):
            mla_one_token(x, bad_scale, *norms, cs, cs, True, (H, N, R, C, V), kv, pe, None, w_uk, w_uv_t, 0.1)
        missing = {**codes, "wkv_a": None}
        with pytest.raises(ValueError, match="give wq alone, or wq_a and wq_b with q_norm"):
            mla_one_token(x, missing, *norms, cs, cs, True, (H, N, R, C, V), kv, pe, None, w_uk, w_uv_t, 0.1)


def test_remembered_descriptors_follow_the_activations_and_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The call remembers each layer's checked projections by their layout (kernels/mla_one_token.py
    ``projection_descriptors``): one model decoded with fp32 activations, then int8 ones, then with its codes
    rewritten in place and with a projection swapped for a copy elsewhere in memory, each time as with the call
    off."""
    model = quantised_tiny(8, 48)
    calls = served_calls(monkeypatch, mla_module, "mla_one_token")
    wq_b = model.layers[0].attn.wq_b
    with torch.inference_mode():
        for activations in ("fp32", "int8", "int8", "fp32"):
            with kernel_path("scalar", activations):
                got, plain = decode(model), without_call(model, monkeypatch)
            torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
            if activations == "int8":  # codes rewritten in place: same layout, new values
                wq_b.qweight.copy_(torch.flip(wq_b.qweight, dims=(0,)))
        before = decode(model)
        monkeypatch.setattr(wq_b, "qweight", torch.zeros_like(wq_b.qweight))  # another address, zero codes
        got = decode(model)
        torch.testing.assert_close(got, without_call(model, monkeypatch), rtol=1e-5, atol=1e-5)
    assert calls and all(calls)
    assert not torch.allclose(got, before)
