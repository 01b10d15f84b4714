"""The inference fast paths (fused absorbed attention, float/bf16 matmul kernel, fused routed experts, the one-token
dispatch) against the plain paths they twin (``reference_paths()``): greedy tokens identical and logits close in
fp32, close to the fp32 model in bf16, under padding and batches, and the cached absorbed matrices follow the
weights."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from test_model_configs import small_config

from deepseek_moe.kernels import cpu_build, float_matmul
from deepseek_moe.kernels.switch import reference_paths
from deepseek_moe.model import mla
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.model.mla import MLA
from deepseek_moe.moe.layer import MoE
from deepseek_moe.nn import linear
from deepseek_moe.presets import tiny


def _teacher_forced(model: DeepSeekMoEForCausalLM, ids: torch.Tensor, prefill: int,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of every position: a prefill of ``prefill`` tokens then one token a step, through the cache."""
    cache = model.new_cache()
    part = None if mask is None else mask[:, :prefill]
    outs = [model(ids[:, :prefill], attention_mask=part, cache=cache).logits]
    for t in range(prefill, ids.shape[1]):
        part = None if mask is None else mask[:, t:t + 1]
        outs.append(model(ids[:, t:t + 1], attention_mask=part, cache=cache).logits)
    return torch.cat(outs, dim=1).float()


def _greedy(model: DeepSeekMoEForCausalLM, prompt: torch.Tensor, n: int) -> list[int]:
    cache = model.new_cache()
    tok = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
    out = [int(tok)]
    for _ in range(n - 1):
        tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)
        out.append(int(tok))
    return out


@pytest.fixture(scope="module")
def tiny_model() -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)
    return DeepSeekMoEForCausalLM(tiny()).eval()


def _spy(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, calls: dict[str, int]) -> None:
    real = getattr(owner, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls[name] = calls.get(name, 0) + 1
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, counted)


def test_fp32_greedy_tokens_identical_and_logits_close(tiny_model: DeepSeekMoEForCausalLM,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, int] = {}  # the fast paths must really run, or this would compare the plain path to itself
    _spy(monkeypatch, MLA, "_absorbed_fused", calls)
    real_decode = mla.absorbed_decode

    def decode_ran(*args: Any) -> torch.Tensor | None:  # counted only where the C++ call really served the step
        out = real_decode(*args)
        if out is not None:
            calls["absorbed_decode"] = calls.get("absorbed_decode", 0) + 1
        return out
    monkeypatch.setattr(mla, "absorbed_decode", decode_ran)
    _spy(monkeypatch, float_matmul, "float_experts_one_token", calls)
    _spy(monkeypatch, linear, "float_matmul_kernel", calls)
    prompt = torch.randint(0, tiny_model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        fast_tokens, fast_logits = _greedy(tiny_model, prompt, 16), _teacher_forced(tiny_model, ids, 5)
        with reference_paths():
            plain_tokens, plain_logits = _greedy(tiny_model, prompt, 16), _teacher_forced(tiny_model, ids, 5)
        full = tiny_model(ids).logits  # no cache: the plain path whatever the switch says
    expected = {"_absorbed_fused", "float_experts_one_token", "float_matmul_kernel", "absorbed_decode"}
    if cpu_build.load_mla_decode_library() is None:  # no compiler: the batched products serve it
        expected.remove("absorbed_decode")
    assert set(calls) == expected, calls
    assert fast_tokens == plain_tokens
    torch.testing.assert_close(fast_logits, plain_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast_logits, full, atol=1e-4, rtol=1e-4)


def test_bf16_fast_path_as_close_to_fp32_as_the_plain_one(tiny_model: DeepSeekMoEForCausalLM) -> None:
    bf16 = copy.deepcopy(tiny_model).to(torch.bfloat16)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :4] = 0  # left padding: the fused attention's mask and the experts' token mask
    with torch.inference_mode():
        want = tiny_model(ids, attention_mask=mask).logits[mask.bool()]
        fast = _teacher_forced(bf16, ids, 6, mask)[mask.bool()]
        with reference_paths():
            plain = _teacher_forced(bf16, ids, 6, mask)[mask.bool()]
    plain_err, fast_err = (plain - want).abs().max().item(), (fast - want).abs().max().item()
    assert plain_err < 0.1  # bf16 rounding of a randomly initialised model: ~0.02 measured
    assert fast_err < max(2 * plain_err, 0.05), (fast_err, plain_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_absorbed_attention_equals_plain_with_padding(dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    model = DeepSeekMoEForCausalLM(small_config(attn_impl="absorb")).to(dtype).eval()
    ids = torch.randint(0, 64, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5], mask[2, :2] = 0, 0
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    with torch.no_grad():
        fast = _teacher_forced(model, ids, 4, mask)
        with reference_paths():
            plain = _teacher_forced(model, ids, 4, mask)
    real = mask.bool()
    torch.testing.assert_close(fast[real], plain[real], atol=tol, rtol=tol)


def test_absorbed_matrices_follow_the_weight() -> None:
    torch.manual_seed(5)
    model = DeepSeekMoEForCausalLM(small_config(attn_impl="absorb")).eval()
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        _teacher_forced(model, ids, 4)  # builds the cached matrices
        for layer in model.layers:
            layer.attn.wkv_b.weight.mul_(1.5)  # an in-place write: the version counter moves
        fast = _teacher_forced(model, ids, 4)
        with reference_paths():
            plain = _teacher_forced(model, ids, 4)
        model.load_state_dict({k: v * 0.5 if "wkv_b" in k else v for k, v in model.state_dict().items()})
        fast2 = _teacher_forced(model, ids, 4)
        with reference_paths():
            plain2 = _teacher_forced(model, ids, 4)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast2, plain2, atol=1e-5, rtol=1e-5)


def test_absorbed_matrices_follow_a_fused_adamw_step() -> None:
    """torch's fused AdamW (the training default) writes parameters without moving their version counters: the
    cache must not outlive a switch to training and back."""
    from deepseek_moe.train.config import OptimConfig
    from deepseek_moe.train.optim import build_optimizer

    torch.manual_seed(5)
    model = DeepSeekMoEForCausalLM(small_config(attn_impl="absorb")).eval()
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        _teacher_forced(model, ids, 4)  # builds the cached matrices
    model.train()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        fast = _teacher_forced(model, ids, 4)
        with reference_paths():
            plain = _teacher_forced(model, ids, 4)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5])
def test_moe_layer_fast_paths_equal_plain(dtype: torch.dtype, tokens: int) -> None:
    torch.manual_seed(6)
    cfg = tiny().moe
    layer = MoE(cfg).eval().to(dtype)
    x = torch.randn(1, tokens, cfg.dim).to(dtype)
    with torch.no_grad():
        fast = layer(x).float()
        with reference_paths():
            plain = layer(x).float()
        want = layer.float()(x.float())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast, plain if dtype == torch.float32 else want, atol=tol, rtol=tol)


def test_training_forward_untouched_by_the_fast_paths(tiny_model: DeepSeekMoEForCausalLM) -> None:
    """With autograd on every kernel declines: the forward is bitwise the plain one and gradients flow."""
    model = copy.deepcopy(tiny_model)
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7))
    fast = model(ids).logits
    with reference_paths():
        plain = model(ids).logits
    assert torch.equal(fast, plain)
    fast.sum().backward()
    assert model.layers[-1].ffn.experts.w1.grad is not None


@pytest.mark.parametrize("native", [False, True])
def test_bf16_prefill_rows_leave_the_kernel_where_torch_bf16_is_native(native: bool,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Where oneDNN multiplies bf16 (AVX-512, AMX) many rows stay on torch; decode rows take the kernel anywhere."""
    monkeypatch.setattr(linear, "torch_bf16_matmul_is_native", lambda: native)
    calls: dict[str, int] = {}
    _spy(monkeypatch, linear, "float_matmul_kernel", calls)
    layer = linear.Linear(64, 32, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer(torch.randn(1, 64).bfloat16())
        assert calls == {"float_matmul_kernel": 1}
        layer(torch.randn(40, 64).bfloat16())
    assert calls == {"float_matmul_kernel": 1 if native else 2}


@pytest.mark.parametrize("tokens", [1, 2, 40])
def test_frozen_experts_still_pass_the_router_its_gradient(tokens: int) -> None:
    """The fused expert kernels have no backward: with the experts and the input frozen they must still decline
    while the gates carry the router's gradient (a router-only fine-tune), at one token and at a few."""
    from deepseek_moe.config import MoEConfig

    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2)).train()
    moe.experts.requires_grad_(False)
    y = moe(torch.randn(tokens, 16))
    assert y.requires_grad
    y.square().sum().backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_one_token_path_runs_and_keeps_greedy_decoding(tiny_model: DeepSeekMoEForCausalLM, bits: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A quantised model's batch-1 decode steps take the experts' one-token kernel call (QuantRoutedExperts.
    one_token), and decode what the sorted path (one_token refused, so the dispatcher sorts, gathers and scatters
    around the same fused kernel) decodes, token for token, with the same logits up to rounding."""
    from deepseek_moe.quant import QuantConfig, quantize_model
    from deepseek_moe.quant import modules as quant_modules

    model = quantize_model(copy.deepcopy(tiny_model), QuantConfig(bits=bits))
    results: list[bool] = []
    real = quant_modules.quant_experts_one_token

    def counted(*args: object, **kwargs: object) -> object:
        y = real(*args, **kwargs)  # type: ignore[arg-type]
        results.append(y is not None)
        return y

    monkeypatch.setattr(quant_modules, "quant_experts_one_token", counted)
    # The whole-layer call (test_moe_one_token.py) would serve these steps before the experts' call is asked.
    monkeypatch.setattr(MoE, "_one_token_call", lambda self: None)
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        fast_tokens, fast_logits = _greedy(model, prompt, 12), _teacher_forced(model, ids, 5)
        ran = sum(results)
        monkeypatch.setattr(quant_modules.QuantRoutedExperts, "one_token", lambda self, *args: None)
        sorted_tokens, sorted_logits = _greedy(model, prompt, 12), _teacher_forced(model, ids, 5)
    n_moe = sum(isinstance(m, MoE) for m in model.modules())
    assert ran == len(results) >= n_moe * (11 + 11), results  # every decode step, every MoE layer, a result
    assert fast_tokens == sorted_tokens
    torch.testing.assert_close(fast_logits, sorted_logits, atol=1e-5, rtol=1e-5)
