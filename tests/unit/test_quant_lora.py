"""LoRA on a frozen quantised base: the products pass x's gradient without keeping dequantised weights, and a
quantised model with adapters gives the loss and adapter gradients of the float model holding the dequantised
weights; codes and scales never train; merging into codes is refused."""

from __future__ import annotations

import pytest
import torch
from test_adapters_lora import ids, small_model

from deepseek_moe.adapters import GROUPS, LoRAConfig, apply_lora, lora_modules, mark_trainable, merge_lora
from deepseek_moe.adapters.lora import ExpertLoRA, QuantLoRALinear
from deepseek_moe.kernels import quant_matmul as qm
from deepseek_moe.kernels.quant_layout import dequantize
from deepseek_moe.moe.experts import RoutedExperts
from deepseek_moe.quant import QuantConfig, QuantLinear, QuantRoutedExperts, quantize_model
from deepseek_moe.quant.grad import frozen_quant_grouped, frozen_quant_matmul
from deepseek_moe.quant.modules import quantize_rows


def _codes(bits: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return quantize_rows(w, bits, 32)


@pytest.mark.parametrize("bits", [8, 4])
def test_frozen_quant_matmul_value_and_input_grad_equal_the_dequantised_weight(bits, monkeypatch):
    monkeypatch.setattr(qm, "TILE_ROWS", 16)  # several tiles in the backward's reference path (int4 takes it)
    q, s = _codes(bits, 40, 64)
    w = dequantize(q, s)
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = frozen_quant_matmul(x, q, s)
    y_ref = x_ref @ w.t()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_frozen_quant_grouped_equals_a_per_expert_loop(bits):
    E, N, K = 4, 24, 64
    stacked = [_codes(bits, N, K, seed=e) for e in range(E)]
    q, s = torch.stack([c for c, _ in stacked]), torch.stack([sc for _, sc in stacked])
    counts = [3, 0, 20, 2]  # an expert with no rows; one with enough for the kernel's strip path (int8)
    assert qm.strip_rows() in (None, *range(1, 21))
    x = torch.randn(sum(counts), K, requires_grad=True)
    y = frozen_quant_grouped(x, q, s, torch.tensor(counts))
    x_ref = x.detach().clone().requires_grad_(True)
    w = [dequantize(q[e], s[e]) for e in range(E)]
    y_ref = torch.cat([xe @ w[e].t() for e, xe in enumerate(x_ref.split(counts))])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="counts sum to 24, x has 25 rows"):
        frozen_quant_grouped(x, q, s, [3, 0, 20, 1])


def _dequantised_twin(float_model, quantised):
    """The float model holding every quantised weight's dequantised value (the reference)."""
    ref = small_model()
    ref.load_state_dict(float_model.state_dict())
    with torch.no_grad():
        for name, mod in quantised.named_modules():
            if isinstance(mod, QuantLinear):
                ref.get_submodule(name).weight.copy_(mod.weight)
            elif isinstance(mod, QuantRoutedExperts):
                target = ref.get_submodule(name)
                assert isinstance(target, RoutedExperts)
                for w in ("w1", "w2", "w3"):
                    for e in range(mod.n_experts):
                        getattr(target, w)[e] = dequantize(getattr(mod, w)[e], getattr(mod, f"{w}_scale")[e])
    return ref


def _lora_state(model):
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k or ".adapter." in k}


@pytest.mark.parametrize("bits", [8, 4])
def test_loss_and_adapter_grads_equal_the_dequantised_fp32_base(bits):
    quantised = quantize_model(small_model(), QuantConfig(bits=bits, keep=frozenset()))  # wkv_b too
    assert isinstance(quantised.head, QuantLinear) and isinstance(quantised.layers[1].attn.wkv_b, QuantLinear)
    ref = _dequantised_twin(small_model(), quantised)
    cfg = LoRAConfig(r=4, targets=GROUPS, init="random")
    torch.manual_seed(5)
    names = apply_lora(quantised, cfg)
    apply_lora(ref, cfg)
    ref.load_state_dict(_lora_state(quantised), strict=False)
    adapters = lora_modules(quantised)
    assert isinstance(adapters["head"], QuantLoRALinear) and isinstance(adapters["layers.1.ffn.experts"], ExpertLoRA)
    assert set(names) == set(lora_modules(ref))
    losses = {}
    for tag, model in (("q", quantised), ("ref", ref)):
        mark_trainable(model)
        model.train()
        x = ids()
        out = model(x, labels=x)
        out.loss.backward()
        losses[tag] = out.loss.detach()
    torch.testing.assert_close(losses["q"], losses["ref"], rtol=1e-5, atol=1e-6)
    q_grads = {n: p.grad for n, p in quantised.named_parameters() if p.requires_grad}
    r_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert set(q_grads) == set(r_grads) and len(q_grads) >= 2 * len(names)
    for n, g in q_grads.items():
        assert g is not None and g.abs().max() > 0, n
        torch.testing.assert_close(g, r_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_codes_and_scales_never_train_and_no_dequantised_weight_is_kept():
    quantised = quantize_model(small_model(), QuantConfig(bits=8))
    apply_lora(quantised, LoRAConfig(r=2, targets=GROUPS, init="random"))
    trainable = mark_trainable(quantised)
    assert all(".lora_" in n or ".adapter." in n for n in trainable)
    frozen = {n: b.clone() for n, b in quantised.named_buffers()
              if n.endswith(("qweight", "_scale", ".w1", ".w2", ".w3"))}
    assert any(n.endswith(".w2") for n in frozen) and any(n.endswith("weight_scale") for n in frozen)
    weight_shapes = {tuple(m.qweight.shape) for m in quantised.modules() if isinstance(m, QuantLinear)}
    weight_shapes |= {tuple(m.w1.shape[1:]) for m in quantised.modules() if isinstance(m, QuantRoutedExperts)}
    weight_shapes |= {tuple(m.w2.shape[1:]) for m in quantised.modules() if isinstance(m, QuantRoutedExperts)}
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []
    codes_saved: list[torch.Tensor] = []
    # The float weights the model holds (the kept wkv_b, the router) are saved by reference: no new memory.
    held = {t.untyped_storage().data_ptr() for t in [*quantised.parameters(), *quantised.buffers()]}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in held:
            saved.append((tuple(t.shape), t.dtype))
        elif t.dtype == torch.int8:
            codes_saved.append(t)
        return t

    opt = torch.optim.SGD([p for p in quantised.parameters() if p.requires_grad], lr=1.0)
    x = ids()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = quantised(x, labels=x).loss
    loss.backward()
    opt.step()
    kept = [s for s, dtype in saved if dtype.is_floating_point and s in weight_shapes]
    assert not kept, f"the autograd graph kept dequantised weights of shapes {kept}"
    assert codes_saved  # the codes are what the backward keeps
    for n, b in quantised.named_buffers():
        if n in frozen:
            assert b.grad is None and not b.requires_grad, n
            assert torch.equal(b, frozen[n]), f"{n} changed in a training step"


def test_merging_into_codes_is_refused_and_removal_restores_the_base():
    quantised = quantize_model(small_model(), QuantConfig(bits=8))
    x = ids()
    with torch.no_grad():
        before = quantised(x).logits
        apply_lora(quantised, LoRAConfig(r=2, targets=GROUPS))  # zero B: the base
        # (within rounding, not bit for bit: adapted experts run one product at a time, not the fused kernel)
        torch.testing.assert_close(quantised(x).logits, before, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unquantised base checkpoint"):
        merge_lora(quantised)
    assert lora_modules(quantised)  # nothing was changed by the refused merge


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("counts", [[3, 0, 5, 0, 2, 4], [0, 0, 14, 0, 0, 0]], ids=["empty_experts", "one_expert_all"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("gathered", [True, False], ids=["rows_of_tokens", "sorted_rows"])
def test_compact_expert_swiglu_equals_the_plain_autograd_path(bits, counts, gated, gathered):
    """The compact LoRA SwiGLU (adapters/quant_experts.py) against autograd through the plain SwiGLU: the output
    and the gradients of x, the gates and all four adapter tensors; given the rows or the tokens and which token
    each row is (``rows_A``: a token may feed several rows, or none)."""
    E, D, F_, T = len(counts), 64, 32, 9
    torch.manual_seed(0)
    experts = QuantRoutedExperts.from_experts(RoutedExperts(E, D, F_), bits=bits, group_size=32)
    adapter = ExpertLoRA(experts, LoRAConfig(r=4, init="random", alpha=8.0))
    experts.adapter = adapter
    A = sum(counts)
    rows_A = torch.randint(0, T - 1, (A,), generator=torch.Generator().manual_seed(2)) if gathered else None
    x = torch.randn(T if gathered else A, D)
    gates = torch.rand(A) if gated else None
    counts_E = torch.tensor(counts)
    dy = torch.randn(A, D)
    results = {}
    for compact in (True, False):
        adapter.compact = compact
        adapter.zero_grad(set_to_none=True)
        x_ = x.clone().requires_grad_(True)
        g_ = None if gates is None else gates.clone().requires_grad_(True)
        if compact:
            y = experts(x_, counts_E, g_, rows_A=rows_A)
        else:  # the plain path on the gathered rows
            y = experts(x_ if rows_A is None else x_.index_select(0, rows_A), counts_E, g_)
        y.backward(dy)
        results[compact] = [y.detach(), x_.grad, *([] if g_ is None else [g_.grad]),
                            *(p.grad for p in adapter.parameters())]
    assert len(results[True]) == len(results[False]) == 6 + gated
    for got, want in zip(results[True], results[False], strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if gathered:
        assert results[True][1][T - 1].abs().max() == 0  # no row of the last token: no gradient


def test_compact_expert_swiglu_keeps_less_for_the_backward():
    """What autograd keeps: the tokens x (T, D) rather than their gathered rows (A, D), the two pre-activations
    and the gates (plus the adapter's own tensors), not the four and more (A, F) activations of the plain path."""
    E, D, F_, A, T = 4, 64, 48, 40, 20
    experts = QuantRoutedExperts.from_experts(RoutedExperts(E, D, F_), bits=8, group_size=32)
    experts.adapter = adapter = ExpertLoRA(experts, LoRAConfig(r=4))
    x = torch.randn(T, D, requires_grad=True)
    rows_A = torch.arange(A) // 2
    gates = torch.rand(A, requires_grad=True)
    counts_E = torch.tensor([10, 10, 10, 10])
    kept = {}
    for compact in (True, False):
        adapter.compact = compact
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            if t.dim() == 2 and t.shape[0] in (A, T):  # activations, not codes or adapter weights
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            experts(x, counts_E, gates, rows_A=rows_A)
        kept[compact] = sorted(sizes)
    assert kept[True] == sorted([T * D, A * F_, A * F_])
    assert sum(kept[False]) >= A * (D + 4 * F_)


def test_bf16_kept_pre_activations_leave_the_forward_and_round_the_gradients():
    """``set_saved_activations(model, "bfloat16")``: the gate/up pre-activations kept for the backward in bf16;
    the output is the fp32 one bit for bit, the gradients equal the fp32 path's within bf16 rounding (and differ:
    the option does something); an unknown dtype is refused naming the setting."""
    from deepseek_moe.adapters.lora import set_saved_activations

    counts = [3, 0, 5, 0, 2, 4]
    E, D, F_ = len(counts), 64, 32
    torch.manual_seed(0)
    experts = QuantRoutedExperts.from_experts(RoutedExperts(E, D, F_), bits=8, group_size=32)
    experts.adapter = ExpertLoRA(experts, LoRAConfig(r=4, init="random", alpha=8.0))
    x, gates, dy = torch.randn(sum(counts), D), torch.rand(sum(counts)), torch.randn(sum(counts), D)
    results = {}
    for dtype in ("float32", "bfloat16"):
        set_saved_activations(experts, dtype)
        experts.zero_grad(set_to_none=True)
        x_, g_ = x.clone().requires_grad_(True), gates.clone().requires_grad_(True)
        kept: list[torch.dtype] = []

        def pack(t: torch.Tensor, kept: list[torch.dtype] = kept) -> torch.Tensor:
            kept.append(t.dtype)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = experts(x_, torch.tensor(counts), g_)
        y.backward(dy)
        results[dtype] = (y.detach(), [x_.grad, g_.grad, *(p.grad for p in experts.adapter.parameters())])
        assert (torch.bfloat16 in kept) == (dtype == "bfloat16")
    assert torch.equal(results["bfloat16"][0], results["float32"][0])
    pairs = list(zip(results["bfloat16"][1], results["float32"][1], strict=True))
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * float(want.abs().max()))
    assert any(not torch.equal(got, want) for got, want in pairs)
    with pytest.raises(ValueError, match="expert_activations"):
        set_saved_activations(experts, "float16")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_frozen_embedding_narrowed_gives_the_rounded_tables_logits_and_grads(dtype: torch.dtype, monkeypatch):
    """A frozen embedding table stored in bf16 (0.42 GB instead of 0.84 at V2-Lite's vocabulary) or in int8 codes
    with a scale per row (0.21 GB) widens its rows on lookup: the loss and adapter gradients equal the fp32
    model's whose table holds the same rounded values (bf16; codes x scale), bit for bit; a table that trains,
    or is the head's weight, stays as it is."""
    from deepseek_moe.adapters import frozen_base, narrow_frozen_embedding
    from deepseek_moe.quant.pack import quantize_int8

    monkeypatch.setattr(frozen_base, "_ROWS_PER_BLOCK", 7)  # int8 codes made by blocks, the last one short
    models = []
    for narrow in (True, False):
        model = quantize_model(small_model(), QuantConfig(bits=8))
        torch.manual_seed(5)
        apply_lora(model, LoRAConfig(r=4, targets=("attention", "routed_experts"), init="random"))
        mark_trainable(model)
        table = model.embed.weight.detach().clone()
        if narrow:
            assert narrow_frozen_embedding(model, dtype) and model.embed.weight.dtype == dtype
            assert not narrow_frozen_embedding(model, dtype)  # already narrowed: nothing is rounded twice
        else:
            codes, scale = quantize_int8(table)
            rounded = table.to(torch.bfloat16).float() if dtype == torch.bfloat16 else codes.float() * scale[:, None]
            assert not torch.equal(rounded, table)  # the comparison would prove nothing otherwise
            with torch.no_grad():
                model.embed.weight.copy_(rounded)
        model.train()
        out = model(ids(), labels=ids())
        out.loss.backward()
        models.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_n, grads_n), (loss_r, grads_r) = models
    assert torch.equal(loss_n, loss_r)
    assert grads_n.keys() == grads_r.keys() and all(torch.equal(grads_n[k], grads_r[k]) for k in grads_n)
    trains = small_model()
    assert not narrow_frozen_embedding(trains, dtype) and trains.embed.weight.dtype == torch.float32
    tied = small_model(tie_word_embeddings=True)
    tied.requires_grad_(False)
    assert not narrow_frozen_embedding(tied, dtype) and tied.embed.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        narrow_frozen_embedding(small_model().requires_grad_(False), torch.int16)


def test_int8_embedding_codes_keep_the_fused_adamw():
    """A frozen parameter holding int8 codes is never stepped, so it must not send the adapters' AdamW from the
    fused kernel (one pass a tensor) back to foreach's several."""
    from deepseek_moe.adapters import narrow_frozen_embedding
    from deepseek_moe.train.config import OptimConfig
    from deepseek_moe.train.optim import build_optimizer

    model = quantize_model(small_model(), QuantConfig(bits=8))
    apply_lora(model, LoRAConfig(r=4, targets=("attention",)))
    mark_trainable(model)
    assert narrow_frozen_embedding(model, torch.int8)
    opt = build_optimizer(model, OptimConfig())
    assert opt.defaults["fused"] and not opt.defaults["foreach"]


@pytest.mark.parametrize("mode", ["full", "attention"])
def test_checkpointing_modes_give_the_plain_adapter_gradients_on_a_quantised_base(mode):
    """The compact expert function under each activation-checkpointing mode (recomputed in the backward under
    "full", run once under "attention") gives the loss and adapter gradients of the run without checkpointing."""
    from deepseek_moe.model.block import set_activation_checkpointing

    runs = []
    for m in ("none", mode):
        model = quantize_model(small_model(), QuantConfig(bits=8))
        torch.manual_seed(5)
        apply_lora(model, LoRAConfig(r=4, targets=("attention", "shared_experts", "routed_experts"), init="random"))
        mark_trainable(model)
        set_activation_checkpointing(model, m)
        model.train()
        out = model(ids(), labels=ids())
        out.loss.backward()
        runs.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (loss_c, grads_c) = runs
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
    assert grads.keys() == grads_c.keys() and any(".adapter." in n for n in grads)
    for n, g in grads.items():
        torch.testing.assert_close(grads_c[n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_shared_experts_keep_bf16_pre_activations_and_round_only_the_gradients():
    """``set_saved_activations`` reaches a MoE layer's shared experts: they keep w1's and w3's outputs in bf16 (two
    (T, F) tensors, no silu(g)), the output is the plain SwiGLU's bit for bit, the gradients equal autograd's
    through ``w2(silu(w1 x) * w3 x)`` within bf16 rounding; float32 restores autograd's own path."""
    from deepseek_moe.adapters.lora import set_saved_activations
    from deepseek_moe.config import MoEConfig
    from deepseek_moe.moe.layer import MoE

    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=24, moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2, n_shared_experts=2,
                        n_expert_groups=1, n_limited_groups=1))
    ffn = moe.shared_experts
    assert ffn is not None
    x, dy = torch.randn(7, 24), torch.randn(7, 24)
    results = {}
    for dtype in ("float32", "bfloat16"):
        set_saved_activations(moe, dtype)
        ffn.zero_grad(set_to_none=True)
        x_ = x.clone().requires_grad_(True)
        kept: list[tuple[tuple[int, ...], torch.dtype]] = []

        def pack(t: torch.Tensor, kept: list = kept) -> torch.Tensor:
            kept.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = ffn(x_)
        y.backward(dy)
        results[dtype] = (y.detach(), [x_.grad, *(p.grad for p in ffn.parameters())])
        wide = [k for k in kept if k[0] == (7, 32)]  # (T, F): F = 2 shared experts x 16
        dtypes = sorted(str(d) for _, d in wide)  # bf16 g and u, and w2's input h; else g, silu(g), u and h
        assert dtypes == (["torch.bfloat16"] * 2 + ["torch.float32"] if dtype == "bfloat16" else ["torch.float32"] * 4)
    assert torch.equal(results["bfloat16"][0], results["float32"][0])
    pairs = list(zip(results["bfloat16"][1], results["float32"][1], strict=True))
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * float(want.abs().max()))
    assert any(not torch.equal(got, want) for got, want in pairs)
    set_saved_activations(moe, "float32")
    assert ffn.saved_dtype is None
