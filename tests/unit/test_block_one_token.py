"""A quantised decoder block's decode step as one C++ call (kernels/block_one_token.py, qgemm.cpp
dsm_block_one_token) against the same model with the call off (each layer's own calls: the same kernels, so equal
to rounding) and under ``reference_paths()`` (plain PyTorch): prefill, decode steps and a verification, dense and
MoE blocks, q-LoRA and a direct wq, V2 and V3 routing, every kernel path this CPU runs, both kinds of activations;
the router's ties, the MoE statistics, and what the call declines."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deepseek_moe.kernels.block_one_token import BlockCall
from deepseek_moe.kernels.switch import reference_paths
from deepseek_moe.model import block as block_module
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.moe.layer import MoE
from deepseek_moe.presets import tiny
from deepseek_moe.quant import QuantConfig, quantize_model
from tests.unit.quant_kernel_paths import assert_call_matches, kernel_path, served_calls

V3_ROUTING = dict(score_func="sigmoid", use_routing_bias=True, n_expert_groups=4, n_limited_groups=2,
                  group_score_func="top2_sum", norm_topk_prob=True, route_scale=2.5)


def quantised_tiny(bits: int, q_lora_rank: int = 0, v3: bool = False) -> DeepSeekMoEForCausalLM:
    """The tiny preset at 3 layers (one dense, two MoE), quantised; V3 routing with a bias that changes choices."""
    torch.manual_seed(0)
    cfg = tiny()
    moe = dataclasses.replace(cfg.moe, **V3_ROUTING) if v3 else cfg.moe  # type: ignore[arg-type]
    cfg = dataclasses.replace(cfg, q_lora_rank=q_lora_rank, n_layers=3, n_dense_layers=1, moe=moe)
    model = DeepSeekMoEForCausalLM(cfg).eval()
    for m in model.modules():
        if isinstance(m, MoE) and m.gate.e_score_correction_bias is not None:
            m.gate.e_score_correction_bias.normal_(std=0.1)
    return quantize_model(model, QuantConfig(bits=bits))


def steps(model: DeepSeekMoEForCausalLM, sizes: tuple[int, ...] = (5, 1, 1, 3, 1), rows: int = 1) -> torch.Tensor:
    """Logits of a prefill and decode steps (a verification of 3 among them) of ``rows`` unpadded rows."""
    ids = torch.randint(1, model.config.vocab_size, (rows, sum(sizes)), generator=torch.Generator().manual_seed(3))
    cache, outs, done = model.new_cache(), [], 0
    for T in sizes:
        outs.append(model(ids[:, done:done + T], cache=cache).logits)
        done += T
    return torch.cat(outs, dim=1)


def without_call(model: DeepSeekMoEForCausalLM, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(block_module.Block, "_one_call", lambda self, *args: None)
        return steps(model)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vnni"])
@pytest.mark.parametrize("activations", ["fp32", "int8"])
@pytest.mark.parametrize("bits,q_lora_rank,v3", [(8, 0, False), (8, 48, True), (4, 64, False), (4, 0, True)])
def test_one_call_equals_the_blocks_layers(isa: str, activations: str, bits: int, q_lora_rank: int, v3: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantised_tiny(bits, q_lora_rank, v3)
    calls = served_calls(monkeypatch, BlockCall, "__call__")
    # every block of every step, the prefill of 5 included
    assert_call_matches(lambda: steps(model), lambda: without_call(model, monkeypatch), calls, 3 * 5, isa,
                        activations)


def test_a_batch_of_rows_and_the_moe_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two unpadded rows go through the call together (B * T tokens routed each on its own); each MoE layer's
    statistics after a step are those its own forward leaves."""
    model = quantised_tiny(8)
    calls = served_calls(monkeypatch, BlockCall, "__call__")
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    with torch.inference_mode():
        got = steps(model, (4, 2, 1), rows=2)
        stats = [(m.last_stats, float(m.aux_loss)) for m in moes]
        with monkeypatch.context() as m:
            m.setattr(block_module.Block, "_one_call", lambda self, *args: None)
            plain = steps(model, (4, 2, 1), rows=2)
        plain_stats = [(m.last_stats, float(m.aux_loss)) for m in moes]
    assert calls == [True] * (3 * 3), calls
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    for (s, loss), (p, plain_loss) in zip(stats, plain_stats, strict=True):
        assert s is not None and p is not None
        K = model.config.moe.n_activated_experts
        assert torch.equal(s.tokens_per_expert, p.tokens_per_expert) and s.n_assignments == p.n_assignments == 2 * K
        assert int(s.dropped) == int(p.dropped) == 0 and loss == plain_loss == 0.0


@pytest.mark.parametrize("v3", [False, True])
def test_a_tie_at_the_routers_cut_leaves_the_moe_layer_to_the_router(v3: bool,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A zero router scores every expert alike: the call runs the attention half (its cache slots kept), returns
    the tie, and the MoE layer's own forward lets the Router choose, as with the call off."""
    model = quantised_tiny(8, v3=v3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                m.gate.weight.zero_()
                if m.gate.e_score_correction_bias is not None:
                    m.gate.e_score_correction_bias.zero_()
    calls = served_calls(monkeypatch, BlockCall, "__call__")
    with torch.inference_mode():
        got = steps(model)
        assert calls == [True] * (3 * 5), calls
        plain = without_call(model, monkeypatch)
        with reference_paths():
            ref = steps(model)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_declines_hooks_adapters_float_shared_experts_and_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepseek_moe.adapters.config import LoRAConfig
    from deepseek_moe.adapters.lora import QuantLoRALinear

    model = quantised_tiny(8, 48)
    with torch.inference_mode():
        want = steps(model)
    served = served_calls(monkeypatch, block_module.Block, "_one_call")
    block = model.layers[1]
    for module in (block.attn_norm, block.ffn_norm, block.attn, block.ffn):
        handle = module.register_forward_pre_hook(lambda *a: None)
        served.clear()
        with torch.inference_mode():
            torch.testing.assert_close(steps(model), want, rtol=1e-5, atol=1e-5)
        handle.remove()
        assert served.count(False) == 5, (module, served)  # block 1 at every step
    base = block.attn.wq_b
    block.attn.wq_b = QuantLoRALinear(base, LoRAConfig(r=2, alpha=4.0, init="random"))
    served.clear()
    with torch.inference_mode():
        got = steps(model)
    block.attn.wq_b = base
    assert served.count(False) == 5 and not torch.allclose(got, want, atol=1e-3)  # the adapter's term is there
    shared = model.layers[2].ffn.shared_experts
    assert shared is not None
    float_shared = type(shared)(model.config.dim, shared.w1.out_features)
    model.layers[2].ffn.shared_experts = float_shared  # kept in float: the MoE call adds it after, the block's does not
    served.clear()
    with torch.inference_mode():
        steps(model)
    assert served.count(False) == 5, served
    model.layers[2].ffn.shared_experts = shared
    mask = torch.ones(2, 3, dtype=torch.long)
    mask[0, 0] = 0
    served.clear()
    with torch.inference_mode():  # a left-padded step: the MoE layer's token mask is the layer's own forward's
        model(torch.ones(2, 3, dtype=torch.long), attention_mask=mask, cache=model.new_cache())
    assert served == [], served


def test_the_cache_is_rolled_back_where_the_kernel_declines_or_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantised_tiny(8)
    with torch.inference_mode():
        want = steps(model)
        with monkeypatch.context() as m:  # declined after the cache grew: rolled back, the layers' calls run
            m.setattr(BlockCall, "__call__", lambda *a, **k: None)
            torch.testing.assert_close(steps(model), want, rtol=1e-5, atol=1e-5)
        cache = model.new_cache()
        model(torch.tensor([[5, 6, 7]]), cache=cache)
        lengths = [layer.length for layer in cache.layers]

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("kernel failed")

        with monkeypatch.context() as m:
            m.setattr(BlockCall, "__call__", broken)
            with pytest.raises(RuntimeError, match="kernel failed"):
                model(torch.tensor([[8]]), cache=cache)
    assert [layer.length for layer in cache.layers] == lengths


def test_the_kept_arguments_follow_every_change_to_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block keeps its call's arguments between steps (model/call_plan.py): after each change below, a decode
    still equals the model with the call off, and the call serves again once the block may take it."""
    from deepseek_moe.adapters.config import LoRAConfig
    from deepseek_moe.adapters.lora import QuantLoRALinear

    model = quantised_tiny(8, 48, v3=True)
    served = served_calls(monkeypatch, block_module.Block, "_one_call")
    block = model.layers[2]
    attn, moe = block.attn, block.ffn
    assert isinstance(moe, MoE) and moe.shared_experts is not None

    def check(takes_call: bool) -> None:
        served.clear()
        with torch.inference_mode():
            got = steps(model)
        assert served.count(False) == (0 if takes_call else 5), served
        with torch.inference_mode():
            torch.testing.assert_close(got, without_call(model, monkeypatch), rtol=1e-5, atol=1e-5)

    check(True)
    handle = moe.gate.register_forward_hook(lambda *a: None)
    check(False)
    handle.remove()
    check(True)
    with torch.no_grad():
        attn.wkv_b.weight.mul_(0.5)  # in place: the absorbed matrices are remade
    check(True)
    with torch.no_grad():
        block.ffn_norm.weight.data = torch.rand_like(block.ffn_norm.weight) + 1  # new storage, same parameter
    check(True)
    moe.shared_experts.w2.qweight = torch.flip(moe.shared_experts.w2.qweight, dims=(0,)).contiguous()  # new buffer
    check(True)
    block.attn_norm.eps = 0.5
    check(True)
    moe.cfg = moe.gate.cfg = dataclasses.replace(moe.cfg, n_limited_groups=1)
    check(True)
    moe.train()  # this layer alone: it routes as in training, by its own forward
    check(False)
    moe.eval()
    check(True)
    for activations in ("int8", "fp32"):
        with kernel_path("scalar", activations):
            check(True)
    base = attn.wq_b
    attn.wq_b = QuantLoRALinear(base, LoRAConfig(r=2, alpha=4.0, init="random"))
    check(False)
    attn.wq_b = base
    model.train()
    served.clear()
    with torch.no_grad():
        model(torch.tensor([[5, 6]]), cache=model.new_cache())
    assert served == [True, False, False], served  # the MoE layers train: their own forward; the dense one may
    model.eval()
    check(True)


def test_a_block_and_its_kept_arguments_are_freed_with_the_model() -> None:
    """The kept arguments live beside the block (model/call_plan.py PLANS, a weak mapping): they must not keep
    it, its weights or the model alive once the model is dropped."""
    import gc
    import weakref

    from deepseek_moe.model.call_plan import PLANS

    model = quantised_tiny(8)
    with torch.inference_mode():
        steps(model)
    block = weakref.ref(model.layers[1])
    assert block() in PLANS
    before = len(PLANS)
    del model
    gc.collect()
    assert block() is None and len(PLANS) == before - 3


def test_as_many_tokens_as_the_call_takes_and_one_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """B * T = 16 (2 rows of 8, 1 of 16) takes the call; 17 does not, and both equal the model with it off."""
    model = quantised_tiny(8)
    calls = served_calls(monkeypatch, BlockCall, "__call__")
    for rows, sizes in ((2, (8,)), (1, (16,)), (1, (17,))):
        calls.clear()
        with torch.inference_mode():
            got = steps(model, sizes, rows=rows)
            with monkeypatch.context() as m:
                m.setattr(block_module.Block, "_one_call", lambda self, *args: None)
                plain = steps(model, sizes, rows=rows)
        assert calls == ([True] * 3 if rows * sum(sizes) <= 16 else []), (rows, sizes, calls)
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


def test_declines_a_forward_replaced_on_an_instance_and_hooks_for_every_module(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantised_tiny(8)
    served = served_calls(monkeypatch, block_module.Block, "_one_call")
    with torch.inference_mode():
        want = steps(model)
    norm = model.layers[1].ffn_norm
    norm.forward = lambda x: torch.zeros_like(x)  # type: ignore[method-assign]  # a wrapper's patch
    served.clear()
    with torch.inference_mode():
        patched = steps(model)
    del norm.forward
    assert served.count(False) == 5 and not torch.allclose(patched, want)  # the patch ran: the block declined
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    served.clear()
    try:
        with torch.inference_mode():
            torch.testing.assert_close(steps(model), want, rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()
    assert served and not any(served), served
