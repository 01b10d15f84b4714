"""The quantised MoE layer's one-call decode step (kernels/moe_one_token.py, qgemm.cpp dsm_moe_one_token) against
the layer's own paths: the same layer with the call switched off (the Router, the experts' one-token kernel, the
shared FeedForward's three products: the same kernels, so equal to rounding) and under ``reference_paths()``
(dequantised weights in plain PyTorch). Every kernel path this CPU runs, both kinds of activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepseek_moe.config import MoEConfig
from deepseek_moe.kernels.moe_one_token import moe_one_token
from deepseek_moe.kernels.switch import reference_paths
from deepseek_moe.moe.layer import MoE
from deepseek_moe.quant.modules import QuantLinear, QuantRoutedExperts
from tests.unit.quant_kernel_paths import kernel_path, served_calls

ROUTING = {
    "v2 softmax": dict(score_func="softmax"),
    "v2 groups": dict(score_func="softmax", n_expert_groups=4, n_limited_groups=2, group_score_func="max",
                      route_scale=2.5),
    "v3 sigmoid": dict(score_func="sigmoid", use_routing_bias=True, n_expert_groups=4, n_limited_groups=2,
                       group_score_func="top2_sum", norm_topk_prob=True, route_scale=2.5),
}


@pytest.fixture(autouse=True)
def _the_layers_own_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are of the layer's own call: a whole block's call (test_block_one_token.py), which takes an
    unpadded step first, is off."""
    from deepseek_moe.model.block import Block

    monkeypatch.setattr(Block, "_one_call", lambda self, *args: None)


def quantised_layer(bits: int, group: int, *, dim: int = 64, inter: int = 32, shared: bool = True,
                    quantise_shared: bool = True, seed: int = 0, **routing: object) -> MoE:
    """A random MoE layer (16 experts, top-3, 2 shared) with quantised routed (and shared) experts, in eval mode;
    the V3 bias drawn so that it changes the selection."""
    torch.manual_seed(seed)
    cfg = MoEConfig(dim=dim, moe_inter_dim=inter, n_routed_experts=16, n_activated_experts=3,
                    n_shared_experts=2 if shared else 0, **routing)  # type: ignore[arg-type]
    moe = MoE(cfg).eval()
    nn.init.normal_(moe.gate.weight, std=0.5)  # spread-out logits: no near-ties between the K-th and next expert
    if moe.gate.e_score_correction_bias is not None:
        moe.gate.e_score_correction_bias.normal_(std=0.1)
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.normal_(std=0.2)
    moe.experts = QuantRoutedExperts.from_experts(moe.experts, bits=bits, group_size=group)  # type: ignore[assignment]
    if shared and quantise_shared:
        ffn = moe.shared_experts
        assert ffn is not None
        for name in ("w1", "w2", "w3"):
            setattr(ffn, name, QuantLinear.from_linear(getattr(ffn, name), bits=bits, group_size=group))
    return moe


def plain(moe: MoE, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """The layer with the one-call path switched off."""
    with monkeypatch.context() as m:
        m.setattr(MoE, "_one_token_call", lambda self: None)
        return moe(x)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vnni"])
@pytest.mark.parametrize("activations", ["fp32", "int8"])
@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (4, 64)])
@pytest.mark.parametrize("routing", list(ROUTING))
def test_one_call_equals_the_layer(isa: str, activations: str, bits: int, group: int, routing: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # int4 in groups of 64 over F = 32: w2 falls back to int8 (a layer whose products are in two formats).
    moe = quantised_layer(bits, group, **ROUTING[routing])
    # Decode steps (the group rankings differ between V2 and V3 on some), a verification of 3, two rows of 2.
    g = torch.Generator().manual_seed(1)
    for x in [*torch.randn(4, 1, 1, 64, generator=g), torch.randn(1, 3, 64, generator=g),
              torch.randn(2, 2, 64, generator=g)]:
        T = x.shape[0] * x.shape[1]
        with kernel_path(isa, activations), torch.inference_mode():
            layer = moe.experts.layer_one_token(x.view(T, 64), moe.gate, moe.shared_experts)  # type: ignore[operator]
            assert layer is not None, "the one-call path declined a layer it serves"
            routing_ref = moe.gate(x.view(T, 64))
            y = moe(x)
            stats = moe.last_stats
            y_plain = plain(moe, x, monkeypatch)
            stats_plain = moe.last_stats
            with reference_paths():
                y_ref = moe(x)
        assert torch.equal(layer.indices_K, routing_ref.indices_TK)  # each token's best first, as topk sorts
        torch.testing.assert_close(layer.gates_K, routing_ref.weights_TK, rtol=1e-6, atol=1e-7)
        assert torch.equal(layer.y_1D, y.view(T, 64))
        assert stats is not None and stats_plain is not None
        assert torch.equal(stats.tokens_per_expert, stats_plain.tokens_per_expert)
        assert stats.n_assignments == stats_plain.n_assignments == 3 * T and int(stats.dropped) == 0
        torch.testing.assert_close(y, y_plain, rtol=1e-5, atol=1e-5)  # the same kernels, summed in another order
        if activations == "fp32":  # int8 activations round x and h: the dequantised reference does not
            torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32)])
def test_odd_widths_and_no_shared_experts(bits: int, group: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """D and F not multiples of the SIMD widths (int8; int4 needs whole groups: D 96, F 32), no shared experts."""
    dim, inter = (40, 24) if bits == 8 else (96, 32)
    for shared in (False, True):
        moe = quantised_layer(bits, group, dim=dim, inter=inter, shared=shared, **ROUTING["v3 sigmoid"])
        x = torch.randn(1, 1, dim)
        with kernel_path("avx2" if "avx2" in _isas() else "scalar", "fp32"), torch.inference_mode():
            assert moe.experts.layer_one_token(x.view(1, dim), moe.gate, moe.shared_experts) is not None  # type: ignore[operator]
            y = moe(x)
            with reference_paths():
                y_ref = moe(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


def _isas() -> list[str]:
    from deepseek_moe.kernels import quant_matmul as qm

    return qm.supported_isas()


def test_shared_experts_kept_in_float_run_after_the_call() -> None:
    moe = quantised_layer(8, 32, quantise_shared=False, **ROUTING["v2 groups"])
    x = torch.randn(1, 1, 64)
    with kernel_path("scalar", "fp32"), torch.inference_mode():
        layer = moe.experts.layer_one_token(x.view(1, 64), moe.gate, moe.shared_experts)  # type: ignore[operator]
        y = moe(x)
        with reference_paths():
            y_ref = moe(x)
    assert layer is not None
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


def test_the_layer_takes_the_call_only_for_a_few_tokens_at_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    moe = quantised_layer(8, 32, **ROUTING["v2 softmax"])
    calls: list[int] = []
    real = QuantRoutedExperts.layer_one_token

    def spy(self: QuantRoutedExperts, *args: object) -> object:
        calls.append(1)
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(QuantRoutedExperts, "layer_one_token", spy)
    with kernel_path("scalar", "fp32"), torch.inference_mode():
        moe(torch.randn(1, 1, 64))
        moe(torch.randn(2, 8, 64))  # 16 tokens: still a few
        assert len(calls) == 2
        moe(torch.randn(1, 17, 64))  # more: the dispatcher's sorted grouped products
        moe(torch.randn(1, 1, 64), token_mask=torch.tensor([[False]]))  # padding: routed nowhere
        moe.train()
        moe(torch.randn(1, 1, 64))  # training: balance losses and counts need the Router's scores
        moe.eval()
    assert len(calls) == 2


def test_declines_what_it_does_not_serve() -> None:
    moe = quantised_layer(8, 32, **ROUTING["v2 softmax"])
    x = torch.randn(1, 64)
    call = moe.experts.layer_one_token  # type: ignore[operator]
    with kernel_path("scalar", "fp32"), torch.inference_mode():
        assert call(x.bfloat16(), moe.gate, moe.shared_experts) is None  # not fp32
        with reference_paths():
            assert call(x, moe.gate, moe.shared_experts) is None
        handle = moe.gate.register_forward_hook(lambda *a: None)
        assert call(x, moe.gate, moe.shared_experts) is None  # a hook the call would skip
        handle.remove()
        assert call(x, moe.gate, moe.shared_experts) is not None
    assert call(x.requires_grad_(), moe.gate, moe.shared_experts) is None  # autograd


def test_bad_arguments_are_named() -> None:
    moe = quantised_layer(8, 32, **ROUTING["v3 sigmoid"])
    experts = moe.experts
    w = {n: (getattr(experts, n), getattr(experts, f"{n}_scale")) for n in ("w1", "w2", "w3")}
    x = torch.randn(1, 64)
    cfg = moe.cfg
    with kernel_path("scalar", "fp32"), torch.inference_mode():
        with pytest.raises(ValueError, match="router weight"):
            moe_one_token(x, torch.randn(16, 63), None, cfg, w, 32)
        with pytest.raises(ValueError, match="router scores 8 experts"):
            moe_one_token(x, torch.randn(8, 64), None, cfg, w, 32)
        with pytest.raises(ValueError, match="bias must be"):
            moe_one_token(x, torch.randn(16, 64), torch.zeros(15), cfg, w, 32)
        # a bias cast with the model: declined, the Router adds it in its own dtype
        assert moe_one_token(x, torch.randn(16, 64), torch.zeros(16, dtype=torch.float64), cfg, w, 32) is None
        with pytest.raises(ValueError, match="1 to 16 fp32 tokens"):
            moe_one_token(torch.randn(17, 64), torch.randn(16, 64), None, cfg, w, 32)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantised_model_decodes_through_the_call_as_without_it(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy decoding of a quantised tiny model: every MoE layer of every decode step takes the call, and the
    tokens and logits are those of the same model with the call off."""
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
    from deepseek_moe.presets import tiny
    from deepseek_moe.quant import QuantConfig, quantize_model
    from deepseek_moe.quant import modules as quant_modules

    torch.manual_seed(0)
    model = quantize_model(DeepSeekMoEForCausalLM(tiny()).eval(), QuantConfig(bits=bits))
    def greedy() -> tuple[list[int], torch.Tensor]:
        cache = model.new_cache()
        logits = [model(torch.arange(3, 10)[None], cache=cache).logits[:, -1]]
        tokens = [int(logits[-1].argmax())]
        for _ in range(10):
            logits.append(model(torch.tensor([[tokens[-1]]]), cache=cache).logits[:, -1])
            tokens.append(int(logits[-1].argmax()))
        return tokens, torch.cat(logits)

    served = served_calls(monkeypatch, quant_modules, "moe_one_token")
    with torch.inference_mode():
        tokens, logits = greedy()
        with monkeypatch.context() as m:
            m.setattr(MoE, "_one_token_call", lambda self: None)
            tokens_off, logits_off = greedy()
    n_moe = sum(isinstance(m, MoE) for m in model.modules())
    assert len(served) == n_moe * 11 and all(served)  # the prefill of 7 and the 10 one-token steps
    assert tokens == tokens_off
    torch.testing.assert_close(logits, logits_off, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("routing", list(ROUTING))
def test_a_tie_at_the_cut_leaves_the_choice_to_the_router(routing: str) -> None:
    """A zero router gives every expert (and group) the same score: torch.topk breaks that tie its own way, so the
    call declines and the layer's output is the Router's choice."""
    moe = quantised_layer(8, 32, **ROUTING[routing])
    with torch.no_grad():
        moe.gate.weight.zero_()
        if moe.gate.e_score_correction_bias is not None:
            moe.gate.e_score_correction_bias.zero_()
    x = torch.randn(1, 1, 64)
    with kernel_path("scalar", "fp32"), torch.inference_mode():
        assert moe.experts.layer_one_token(x.view(1, 64), moe.gate, moe.shared_experts) is None  # type: ignore[operator]
        y = moe(x)
        with reference_paths():
            y_ref = moe(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


def test_declines_expert_parallel_experts_adapters_and_hooks() -> None:
    from deepseek_moe.moe.dispatch import LocalDispatcher

    moe = quantised_layer(8, 32, **ROUTING["v2 softmax"])
    x = torch.randn(1, 64)
    experts = moe.experts
    assert isinstance(experts, QuantRoutedExperts)
    with kernel_path("scalar", "fp32"), torch.inference_mode():
        assert experts.layer_one_token(x, moe.gate, moe.shared_experts) is not None
        experts.offset = 16  # a rank's slice under expert parallelism
        assert experts.layer_one_token(x, moe.gate, moe.shared_experts) is None
        experts.offset = 0
        handle = experts.register_forward_pre_hook(lambda *a: None)
        assert experts.layer_one_token(x, moe.gate, moe.shared_experts) is None
        handle.remove()

        class OtherDispatcher(LocalDispatcher):
            pass

        moe.dispatcher = OtherDispatcher()
        assert moe._one_token_call() is None  # an all-to-all dispatcher is not the local one
        moe.dispatcher = LocalDispatcher()
        assert moe._one_token_call() is not None
    assert torch.is_grad_enabled() and moe.gate.weight.requires_grad
    assert experts.layer_one_token(x, moe.gate, moe.shared_experts) is None  # the router's gradient is the Router's
    with torch.no_grad():
        assert experts.layer_one_token(x, moe.gate, moe.shared_experts) is not None


def test_a_hooked_shared_ffn_runs_as_its_module_after_the_call() -> None:
    moe = quantised_layer(8, 32, **ROUTING["v3 sigmoid"])
    shared = moe.shared_experts
    assert shared is not None
    seen: list[int] = []
    shared.register_forward_hook(lambda *a: seen.append(1))
    x = torch.randn(1, 1, 64)
    with kernel_path("scalar", "fp32"), torch.inference_mode():
        assert moe.experts.layer_one_token(x.view(1, 64), moe.gate, shared) is not None  # type: ignore[operator]
        assert seen == [1]
        y = moe(x)
        with reference_paths():
            y_ref = moe(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


def test_remembered_arguments_follow_the_activations_weights_and_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The call remembers each layer's checked arguments by the weights' layout and the rule
    (kernels/moe_one_token.py ``layer_arguments``): one layer run with fp32 activations, then int8 ones, with its
    expert codes rewritten in place, with the shared experts' codes swapped for a copy elsewhere in memory, and
    with another rule over the same weights, each time as with the call off."""
    from dataclasses import replace

    from deepseek_moe.quant import modules as quant_modules

    moe = quantised_layer(4, 32, **ROUTING["v2 groups"])
    experts, ffn = moe.experts, moe.shared_experts
    assert ffn is not None
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    served = served_calls(monkeypatch, quant_modules, "moe_one_token")
    outs = []
    with torch.inference_mode():
        for activations in ("fp32", "int8", "fp32"):
            with kernel_path("scalar", activations):
                got = moe(x)
                torch.testing.assert_close(got, plain(moe, x, monkeypatch), rtol=1e-5, atol=1e-5)
                outs.append(got)
        assert not torch.allclose(outs[0], outs[1])  # int8 activations round x
        with kernel_path("scalar", "fp32"):
            experts.w2.copy_(torch.flip(experts.w2, dims=(1,)))  # in place: the same layout
            torch.testing.assert_close(moe(x), plain(moe, x, monkeypatch), rtol=1e-5, atol=1e-5)
            monkeypatch.setattr(ffn.w2, "qweight", torch.flip(ffn.w2.qweight, dims=(0,)).contiguous())
            torch.testing.assert_close(moe(x), plain(moe, x, monkeypatch), rtol=1e-5, atol=1e-5)
            before = moe(x)
            moe.cfg = moe.gate.cfg = replace(moe.cfg, n_limited_groups=1)
            got = moe(x)
            torch.testing.assert_close(got, plain(moe, x, monkeypatch), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(got, before)
    assert served and all(served)
