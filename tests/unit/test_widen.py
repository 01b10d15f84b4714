"""A frozen bf16 base under fp32 activations (nn/widen.py, adapters/frozen_base.py): the products equal fp32
products with the bf16-rounded weights, gradients reach only the adapters, and no fp32 copy of a weight is kept
from the forward to the backward."""

import copy

import pytest
import torch
import torch.nn.functional as F

from deepseek_moe import DeepSeekMoEForCausalLM, get_preset
from deepseek_moe.adapters import LoRAConfig, apply_lora, mark_trainable, narrow_frozen_matrices
from deepseek_moe.nn.widen import widened_grouped, widened_linear


def _saved_shapes(fn):
    """(dtype, shape) of every tensor autograd saves while ``fn`` runs."""
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _check_linear_against_fp32(y, x, dy, w, b, tol):
    """y and x's gradient (for dy) equal F.linear's with the weight and bias widened beforehand."""
    (dx,) = torch.autograd.grad(y, x, dy)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, w.float(), b.float())
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, dy)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, dx_ref, rtol=tol, atol=tol)


def test_widened_linear_equals_fp32_with_rounded_weight_and_keeps_no_fp32_copy():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g).to(torch.bfloat16)
    b = torch.randn(24, generator=g).to(torch.bfloat16)
    x = torch.randn(3, 5, 40, generator=g, requires_grad=True)
    y, saved = _saved_shapes(lambda: widened_linear(x, w, b))
    assert (torch.float32, (24, 40)) not in saved and (torch.bfloat16, (24, 40)) in saved
    _check_linear_against_fp32(y, x, torch.randn_like(y), w, b, 1e-6)
    assert w.grad is None and w.dtype == torch.bfloat16


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 9, 0, 0], [0, 0, 0, 0]])
def test_widened_grouped_product_equals_a_per_expert_loop(counts):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 12, 20, generator=g).to(torch.bfloat16)  # (E, M, N)
    counts_E = torch.tensor(counts)
    x = torch.randn(sum(counts), 20, generator=g, requires_grad=True)
    y, saved = _saved_shapes(lambda: widened_grouped(x, w, counts_E))
    assert (torch.float32, (4, 12, 20)) not in saved
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy, allow_unused=True) if sum(counts) else (torch.zeros(0, 20),)
    rows = torch.repeat_interleave(torch.arange(4), counts_E)
    wf = w.float()
    y_ref = torch.stack([wf[e] @ x[i] for i, e in enumerate(rows.tolist())]) if sum(counts) else y
    dx_ref = torch.stack([wf[e].t() @ dy[i] for i, e in enumerate(rows.tolist())]) if sum(counts) else dx
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)


def _lora_model():
    model = DeepSeekMoEForCausalLM(get_preset("tiny"), init_seed=0)
    torch.manual_seed(0)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, init="random",
                                 targets=("attention", "shared_experts", "routed_experts", "dense_ffn", "head")))
    mark_trainable(model)
    return model


def test_a_bf16_base_trains_its_adapters_as_the_fp32_model_of_its_rounded_weights():
    model = _lora_model()
    reference = copy.deepcopy(model)
    assert narrow_frozen_matrices(model) > 0
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    # the matrices narrowed; adapters, embeddings, norms and the routers stay fp32
    assert dtypes["layers.1.ffn.experts.w1"] == torch.bfloat16 and dtypes["layers.0.attn.wq.weight"] == torch.bfloat16
    assert dtypes["head.weight"] == torch.bfloat16 and dtypes["embed.weight"] == torch.float32
    assert dtypes["layers.1.ffn.gate.weight"] == torch.float32 and dtypes["norm.weight"] == torch.float32
    assert all(dtypes[n] == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            q.copy_(p.float())  # the fp32 model computing with the same (rounded) values
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    losses = []
    for m in (model, reference):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        else:
            assert p.grad is None, name


def test_a_narrowed_lora_model_generates_as_the_fp32_model_of_its_rounded_weights():
    """generate() takes MLA's absorbed path, which folds wkv_b's matrix() (base + LoRA update) into the query."""
    from deepseek_moe import generate

    model = _lora_model().eval()
    reference = copy.deepcopy(model)
    narrow_frozen_matrices(model)
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            q.copy_(p.float())
    prompts = [[1, 2, 3, 4], [5, 6]]
    assert generate(model, prompts, max_new_tokens=4).new_tokens == generate(reference, prompts,
                                                                             max_new_tokens=4).new_tokens


def test_a_linear_widened_over_many_tiles_equals_one_product(monkeypatch):
    import deepseek_moe.nn.widen as widen

    monkeypatch.setattr(widen, "TILE_ELEMENTS", 64)  # 40 columns: one row a tile, 37 tiles
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 40, generator=g).to(torch.bfloat16)
    b = torch.randn(37, generator=g).to(torch.bfloat16)
    x = torch.randn(2, 3, 40, generator=g).transpose(0, 1).requires_grad_(True)  # 3-D, not contiguous
    y = widened_linear(x, w, b)
    _check_linear_against_fp32(y, x, torch.randn(y.shape, generator=g), w, b, 1e-5)


def test_narrowing_a_weight_that_trains_is_refused():
    model = DeepSeekMoEForCausalLM(get_preset("tiny"), init_seed=0)
    with pytest.raises(ValueError, match="wants a gradient"):
        narrow_frozen_matrices(model)
    with pytest.raises(ValueError, match="dtype"):
        narrow_frozen_matrices(_lora_model(), torch.float64)
