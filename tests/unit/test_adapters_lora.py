"""LoRA: unmerged equals merged, zero init changes nothing, only adapters train, and the per-expert pair on the
grouped expert paths equals a per-token loop."""

import pytest
import torch
import torch.nn.functional as F

from deepseek_moe import DeepSeekMoEForCausalLM, ModelConfig, MoEConfig
from deepseek_moe.adapters import GROUPS, LoRAConfig, apply_lora, mark_trainable, merge_lora, remove_lora
from deepseek_moe.adapters.lora import ExpertLoRA
from deepseek_moe.kernels import mkl_grouped
from deepseek_moe.kernels.switch import reference_paths
from deepseek_moe.moe.experts import RoutedExperts


def small_config(**changes) -> ModelConfig:
    dim = 32
    fields = dict(vocab_size=64, dim=dim, inter_dim=48, n_layers=3, n_dense_layers=1, n_heads=2, q_lora_rank=16,
                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=64,
                  original_seq_len=64,
                  moe=MoEConfig(dim=dim, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2,
                                n_shared_experts=1))
    return ModelConfig(**{**fields, **changes})


def small_model(seed: int = 0, **changes) -> DeepSeekMoEForCausalLM:
    torch.manual_seed(seed)
    model = DeepSeekMoEForCausalLM(small_config(**changes), init_seed=seed).eval()
    with torch.no_grad():
        for layer in model.layers:
            if layer.is_moe:
                layer.ffn.gate.weight.normal_(std=1.0)  # clear-cut routing: rounding cannot flip a choice
    return model


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(seed))


def test_zero_initialised_adapters_leave_logits_bit_identical():
    model = small_model()
    x = ids()
    # On the plain paths: without adapters inference takes the float kernels (equal up to rounding, tested in
    # test_decode_fast_paths.py), with them the experts' grouped products, so bits would differ for that reason.
    with torch.no_grad(), reference_paths():
        before = model(x).logits
        names = apply_lora(model, LoRAConfig(r=4, targets=GROUPS))
        after = model(x).logits
    assert any(n.endswith("experts") for n in names) and "head" in names
    assert torch.equal(before, after)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_unmerged_equals_merged_on_every_group(use_rslora):
    model = small_model()
    x = ids()
    with torch.no_grad():
        base = model(x).logits
        names = apply_lora(model, LoRAConfig(r=4, alpha=8.0, use_rslora=use_rslora, targets=GROUPS, init="random"))
        unmerged = model(x).logits
        assert set(merge_lora(model)) == set(names)
        merged = model(x).logits
    assert (unmerged - base).abs().max() > 1e-2  # the adapters do something
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert not any("lora" in n or "adapter" in n for n, _ in model.named_parameters())
    assert set(model.state_dict()) == set(small_model().state_dict())  # the base's names, nothing added


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_cached_decoding_applies_the_adapters(attn_impl):
    """The absorbed attention reads wkv_b's matrix rather than calling it: it must see the unmerged update too."""
    model = small_model(attn_impl=attn_impl)
    apply_lora(model, LoRAConfig(r=4, targets=GROUPS, init="random"))
    x = ids()
    with torch.no_grad():
        whole = model(x).logits
        cache = model.new_cache()
        prefill = model(x[:, :6], cache=cache).logits
        step = torch.cat([model(x[:, t:t + 1], cache=cache).logits for t in range(6, x.shape[1])], dim=1)
    torch.testing.assert_close(torch.cat([prefill, step], dim=1), whole, rtol=0, atol=1e-5)


def test_remove_restores_the_base():
    model = small_model()
    x = ids()
    with torch.no_grad():
        base = model(x).logits
        apply_lora(model, LoRAConfig(r=2, targets=GROUPS, init="random"))
        remove_lora(model)
        assert torch.equal(model(x).logits, base)


@pytest.mark.parametrize("train_router", [False, True])
def test_gradients_reach_only_the_adapters(train_router):
    model = small_model().train()
    apply_lora(model, LoRAConfig(r=2, targets=GROUPS, init="random"))
    trainable = set(mark_trainable(model, train_router=train_router))
    x = ids()
    model(x, labels=x).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    router = {n for n, _ in model.named_parameters() if n.endswith("ffn.gate.weight")}
    lora = {n for n, _ in model.named_parameters() if "lora_" in n or ".adapter." in n}
    assert len(router) == 2 and len(lora) > 20
    assert trainable == (lora | router if train_router else lora)
    assert with_grad == trainable


def test_a_target_matching_nothing_is_named():
    model = small_model()
    with pytest.raises(ValueError, match="'wq_z'"):
        apply_lora(model, LoRAConfig(targets=("attention", "wq_z")))
    no_dense = small_model(n_dense_layers=0)
    with pytest.raises(ValueError, match="'dense_ffn'"):
        apply_lora(no_dense, LoRAConfig(targets=("dense_ffn",)))
    assert not any(n.startswith("layers.0.ffn.w") for n in apply_lora(no_dense, LoRAConfig()))  # defaults: lenient


def test_module_names_select_single_modules():
    model = small_model()
    names = apply_lora(model, LoRAConfig(targets=("wkv_b", "layers.2.ffn.experts")))
    assert names == ["layers.0.attn.wkv_b", "layers.1.attn.wkv_b", "layers.2.attn.wkv_b", "layers.2.ffn.experts"]
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, LoRAConfig(targets=("wkv_b",)))


def test_tied_head_is_refused():
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        apply_lora(small_model(tie_word_embeddings=True), LoRAConfig(targets=("head",)))


def test_config_is_validated():
    for bad, field in ((dict(r=0), "r"), (dict(alpha=0.0), "alpha"), (dict(dropout=1.0), "dropout"),
                       (dict(targets="attention"), "targets"), (dict(targets=()), "targets")):
        with pytest.raises(ValueError, match=field):
            LoRAConfig(**bad)


def _per_token_reference(experts: RoutedExperts, lora: ExpertLoRA, x_AD, counts_E, gates_A):
    """One row at a time in float64, the adapted weights written out: W + s B A for each projection."""
    s, F_ = lora.scaling, experts.w1.shape[1]
    d = lambda t: t.detach().double()  # noqa: E731
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts_E)), counts_E)
    out = []
    for a, e in enumerate(expert_of_row.tolist()):
        x = d(x_AD[a])
        B_gu, A_gu = d(lora.gate_up_B[e]), d(lora.gate_up_A[e])
        w1 = d(experts.w1[e]) + s * B_gu[:F_] @ A_gu
        w3 = d(experts.w3[e]) + s * B_gu[F_:] @ A_gu
        w2 = d(experts.w2[e]) + lora.down_scaling * d(lora.down_B[e]) @ d(lora.down_A[e])
        out.append(w2 @ (F.silu(w1 @ x) * (w3 @ x) * float(gates_A[a])))
    return torch.stack(out)


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 7, 0], [2, 2, 2, 2]])
def test_expert_lora_on_every_grouped_path_equals_a_per_token_loop(counts):
    torch.manual_seed(0)
    experts = RoutedExperts(4, 16, 8, init_std=0.3)
    lora = ExpertLoRA(experts, LoRAConfig(r=4, alpha=4.0, init="random"), down=LoRAConfig(r=3, alpha=9.0))
    experts.adapter = lora
    counts_E = torch.tensor(counts)
    x = torch.randn(int(counts_E.sum()), 16)
    gates = torch.rand(x.shape[0])
    ref = _per_token_reference(experts, lora, x, counts_E, gates).float()
    grads = {}
    for path, (mkl, grouped) in {"mkl": (True, True), "grouped_mm": (False, True), "loop": (False, False)}.items():
        if path == "mkl" and not mkl_grouped.available():
            continue
        experts.use_mkl_batch, experts.use_grouped_mm = mkl, grouped
        y = experts(x, counts_E, gates)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        grads[path] = torch.autograd.grad(y.square().sum(), list(lora.parameters()))
    for path, got in grads.items():
        for a, b in zip(got, grads["loop"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=path)
