"""The export form of the MoE layer (dense gates, fused experts) equals the layer, and refuses what it can't be."""

import pytest
import torch

from deepseek_moe import MoE, MoEConfig
from deepseek_moe.export import DenseMoE, ExportError, dense_moe_layers

BASE = dict(dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2)
CONFIGS = {
    "deepseekmoe": dict(n_shared_experts=2),
    "no-shared": dict(),
    "v2-group-limited": dict(n_shared_experts=1, n_expert_groups=4, n_limited_groups=2, route_scale=1.5),
    "v3-bias": dict(n_shared_experts=1, n_expert_groups=4, n_limited_groups=2, score_func="sigmoid",
                    group_score_func="top2_sum", norm_topk_prob=True, route_scale=2.5, use_routing_bias=True),
    "eval-time-no-drop": dict(capacity_factor=1.0),  # dropping is a training-time rule unless drop_at_inference
}


def make_moe(seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(MoEConfig(**{**BASE, **overrides})).eval()
    with torch.no_grad():  # weights large enough that a wrong expert or gate shows in the output
        for p in moe.parameters():
            p.normal_(0, 0.3)
        if moe.gate.e_score_correction_bias is not None:
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return moe


@pytest.mark.parametrize("name", CONFIGS)
def test_dense_form_equals_the_layer(name):
    moe = make_moe(**CONFIGS[name])
    x = torch.randn(4, 16, BASE["dim"])
    with torch.no_grad():
        expected = moe(x)
        assert (moe.last_stats.tokens_per_expert > 0).all()  # every expert is exercised
        got = DenseMoE(moe)(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(DenseMoE(moe)(x[0]), moe(x[0]), rtol=1e-5, atol=1e-5)  # (S, dim) input


def test_padding_tokens_get_zero_as_in_the_layer():
    moe = make_moe(**CONFIGS["v2-group-limited"])
    x = torch.randn(2, 6, BASE["dim"])
    token_mask = torch.ones(2, 6, dtype=torch.bool)
    token_mask[1, :3] = False
    with torch.no_grad():
        expected = moe(x, token_mask=token_mask)
        torch.testing.assert_close(DenseMoE(moe)(x, token_mask=token_mask), expected, rtol=1e-5, atol=1e-5)
    assert (expected[1, :3] == 0).all()


def test_swap_is_undone_and_restores_the_same_layers():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), make_moe())
    layer = model[1]
    with dense_moe_layers(model) as m:
        assert isinstance(m[1], DenseMoE)
    assert model[1] is layer


@pytest.mark.parametrize("overrides, setup, message", [
    (dict(), lambda m: setattr(m, "uniform_routing", True), "uniform_routing"),
    (dict(capacity_factor=1.0, drop_at_inference=True), None, "drop_at_inference"),
    (dict(), lambda m: m.to(torch.bfloat16), "float32"),
])
def test_refuses_what_a_static_graph_cannot_reproduce(overrides, setup, message):
    moe = make_moe(**overrides)
    if setup is not None:
        setup(moe)
    model = torch.nn.Sequential(torch.nn.Identity(), moe)
    with pytest.raises(ExportError, match=message):
        with dense_moe_layers(model):
            pass
    assert model[1] is moe
