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
