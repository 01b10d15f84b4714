"""nn/cross_entropy.py against F.cross_entropy: values, gradients, what autograd keeps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepseek_moe.nn import cross_entropy as ce_module
from deepseek_moe.nn.cross_entropy import cross_entropy


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("slab", [1 << 22, 37 * 3])  # one slab; slabs of 3 rows, the last one short
def test_equals_torch_cross_entropy(reduction: str, slab: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ce_module, "SLAB_ELEMENTS", slab)
    torch.manual_seed(0)
    logits = (torch.randn(10, 37, dtype=torch.float64) * 4).requires_grad_(True)
    targets = torch.randint(0, 37, (10,))
    targets[[2, 7]] = -100
    ours = cross_entropy(logits, targets, -100, reduction)
    ref = F.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    dloss = torch.tensor(1.7, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(ours, logits, dloss)
    (g_ref,) = torch.autograd.grad(ref, logits, dloss)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(g_ours[[2, 7]], torch.zeros(2, 37, dtype=torch.float64))  # ignored rows get nothing
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, targets, -100, reduction), (logits,))


def test_every_target_ignored_is_nan_as_torch_gives() -> None:
    logits = torch.randn(4, 9, requires_grad=True)
    targets = torch.full((4,), -100)
    assert torch.isnan(cross_entropy(logits, targets)) and torch.isnan(F.cross_entropy(logits, targets))
    assert cross_entropy(logits, targets, reduction="sum").item() == 0.0


def test_keeps_the_logits_and_a_number_a_row() -> None:
    # F.cross_entropy keeps a log-softmax copy of the logits; this keeps the logits themselves.
    logits = torch.randn(16, 1000, requires_grad=True)
    targets = torch.randint(0, 1000, (16,))
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cross_entropy(logits, targets)
    big = [t for t in kept if t.numel() >= 16 * 1000]
    assert len(big) == 1 and big[0].untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()


def test_bad_shapes_and_reduction_are_named() -> None:
    with pytest.raises(ValueError, match=r"logits \(N, V\) and targets \(N,\)"):
        cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), reduction="none")


def _heads() -> list[torch.nn.Module]:
    from deepseek_moe.nn.linear import Linear
    from deepseek_moe.quant.modules import QuantLinear

    torch.manual_seed(1)
    dense = Linear(24, 37, bias=False)
    quant = QuantLinear.from_linear(dense, bits=8, group_size=8)
    quant4 = QuantLinear.from_linear(dense, bits=4, group_size=8)
    for head in (dense, quant, quant4):
        head.requires_grad_(False)
    return [dense, quant, quant4]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["linear", "int8", "int4"])
def test_frozen_head_loss_equals_head_then_cross_entropy(which: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fused path computes hidden's gradient in the forward, 16 vocabulary rows a slice here (37: three slices).
    from deepseek_moe.nn.cross_entropy import head_cross_entropy

    monkeypatch.setattr(ce_module, "HEAD_SLICE_ROWS", 16)
    head = _heads()[which]
    torch.manual_seed(2)
    hidden = torch.randn(11, 24, requires_grad=True)
    targets = torch.randint(0, 37, (11,))
    targets[[0, 5]] = -100
    targets[1] = 36  # the last slice's last row
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, loss = head_cross_entropy(head, hidden, targets)
    assert not any(t.shape == (11, 37) for t in kept)  # neither logits nor an (N, V) gradient
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    ref_logits = head(ref_hidden).float()
    ref = F.cross_entropy(ref_logits, targets, ignore_index=-100)
    torch.testing.assert_close(logits, ref_logits.detach())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    (loss * 3.0).backward()
    (ref * 3.0).backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-6)


def test_a_head_with_trainable_weights_or_an_inherited_method_takes_the_plain_path() -> None:
    from deepseek_moe.nn import cross_entropy as ce
    from deepseek_moe.nn.linear import Linear

    class Adapted(Linear):  # as an unmerged LoRA pair would: its own forward, Linear's input_grad_rows
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2.0

    hidden = torch.randn(5, 8, requires_grad=True)
    targets = torch.randint(0, 6, (5,))
    for head in (Linear(8, 6, bias=False), Adapted(8, 6, bias=False).requires_grad_(False)):
        _, loss = ce.head_cross_entropy(head, hidden, targets)
        assert not isinstance(loss.grad_fn, ce._FrozenHeadCrossEntropy._backward_cls)
        ref = F.cross_entropy(head(hidden), targets)
        torch.testing.assert_close(loss, ref)


def test_lora_gradients_through_the_fused_loss_equal_the_plain_loss() -> None:
    """A LoRA model with its (frozen) head: forward(labels=...) takes the fused path; its adapters' gradients equal
    those of F.cross_entropy over the same model's logits."""
    from deepseek_moe import DeepSeekMoEForCausalLM
    from deepseek_moe.adapters import LoRAConfig, apply_lora, mark_trainable
    from deepseek_moe.model.causal_lm import IGNORE_INDEX
    from deepseek_moe.presets import get_preset

    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(n_layers=2, vocab_size=300)
    model = DeepSeekMoEForCausalLM(cfg)
    apply_lora(model, LoRAConfig(r=4, init="random", targets=("attention",)))
    mark_trainable(model)
    assert not any(p.requires_grad for p in model.head.parameters())
    ids = torch.randint(0, 300, (2, 9))
    grads = {}
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        if fused:
            out = model(ids, labels=ids)
            loss = out.ce_loss
            assert out.logits.grad_fn is None  # the fused path: logits without a graph
        else:
            logits = model(ids).logits
            targets = F.pad(ids[:, 1:], (0, 1), value=IGNORE_INDEX)
            loss = F.cross_entropy(logits.reshape(-1, 300), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        loss.backward()
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, g in grads[True].items():
        torch.testing.assert_close(g, grads[False][name], rtol=1e-4, atol=1e-6, msg=name)


def test_every_target_ignored_gives_zero_gradients_as_torch() -> None:
    from deepseek_moe.nn.cross_entropy import head_cross_entropy
    from deepseek_moe.nn.linear import Linear

    targets = torch.full((3,), -100)
    logits = torch.randn(3, 5, requires_grad=True)
    cross_entropy(logits, targets).backward()
    assert torch.equal(logits.grad, torch.zeros(3, 5))
    head = Linear(4, 5, bias=False).requires_grad_(False)
    hidden = torch.randn(3, 4, requires_grad=True)
    _, loss = head_cross_entropy(head, hidden, targets)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros(3, 4))
