"""The ablation's variant arithmetic (equal activated and total FFN parameters, counted from the modules) and the
evaluation-time routing of its §4.5 analyses, against hand-computed values and a per-token reference."""

import pytest
import torch

from deepseek_moe.ablate.routing import AlteredRouter, altered_routing
from deepseek_moe.ablate.run import masked_counts
from deepseek_moe.ablate.variants import (
    BALANCE_VARIANTS,
    VARIANTS,
    AblationShape,
    count_variant,
    variant_config,
)
from deepseek_moe.config import MoEConfig
from deepseek_moe.moe.experts import FeedForward
from deepseek_moe.moe.layer import MoE
from deepseek_moe.moe.router import Router

SHAPES = [AblationShape(), AblationShape(dim=64, n_layers=3, n_heads=2, n_experts=16, expert_dim=96, segmentation=2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_equal_activated_and_total_ffn_parameters(shape):
    D, N, W, moe_layers = shape.dim, shape.n_experts, shape.expert_dim, shape.n_layers - 1
    swiglu = 3 * D  # parameters per hidden unit of a SwiGLU FFN (w1, w2, w3)
    counts = {v: count_variant(variant_config(v, shape), seq_len=64) for v in VARIANTS}
    for v, c in counts.items():
        expected = {"dense": (2 * W, 2 * W), "dense_total": (N * W, N * W), "gshard_x1.5": (3 * N * W // 2, 3 * W)}
        total_width, activated_width = expected.get(v, (N * W, 2 * W))
        assert (c.ffn_total, c.ffn_activated) == (swiglu * total_width * moe_layers,
                                                  swiglu * activated_width * moe_layers), v
    # Everything but the MoE layers' FFN and router is the same model (first layer included).
    rest = {v: c.total_params - c.ffn_total - c.router_params for v, c in counts.items()}
    assert len(set(rest.values())) == 1, rest
    rest_activated = {v: c.activated_params - c.ffn_activated - c.router_params for v, c in counts.items()}
    assert len(set(rest_activated.values())) == 1, rest_activated
    # Routers: one row of `dim` per routed expert and MoE layer.
    routed = {"gshard": N, "shared": N - 1, "fine_grained_m2": 2 * N - 1, "deepseekmoe": shape.segmentation * N - 1,
              "fine_grained_only": shape.segmentation * N, "dense_total": 1, "gshard_x1.5": N, "dense": 0}
    for v, n in routed.items():
        assert counts[v].router_params == n * D * moe_layers, v


def test_variant_structure_follows_the_paper():
    s = AblationShape()
    m, N, W = s.segmentation, s.n_experts, s.expert_dim
    want = {  # (routed, activated, shared, width)
        "gshard": (N, 2, 0, W), "shared": (N - 1, 1, 1, W), "fine_grained_m2": (2 * N - 1, 3, 1, W // 2),
        "deepseekmoe": (m * N - 1, 2 * m - 1, 1, W // m), "fine_grained_only": (m * N, 2 * m, 0, W // m),
        "gshard_x1.5": (N, 2, 0, 3 * W // 2), "dense_total": (1, 1, N - 1, W),
    }
    for v, (routed, activated, shared, width) in want.items():
        cfg = variant_config(v, s)
        moe = cfg.moe
        assert (moe.n_routed_experts, moe.n_activated_experts, moe.n_shared_experts, moe.moe_inter_dim) == (
            routed, activated, shared, width), v
        assert not moe.group_limited and moe.capacity_factor is None and not moe.use_routing_bias, v
        assert moe.expert_loss_alpha == (0.0 if v == "dense_total" else s.expert_loss_alpha), v
        assert (cfg.n_dense_layers, cfg.inter_dim) == (1, 2 * W), v  # the same first layer
    dense = variant_config("dense", s)
    assert (dense.n_dense_layers, dense.inter_dim) == (s.n_layers, 2 * W)
    with pytest.raises(ValueError, match="unknown ablation variant 'moe'"):
        variant_config("moe", s)
    with pytest.raises(ValueError, match="expert_dim \\(100\\) must be divisible by the segmentation 8"):
        AblationShape(expert_dim=100, segmentation=8)


def test_dense_total_layer_is_one_dense_ffn():
    """N-1 shared experts + 1 routed expert taken with gate 1 compute a SwiGLU of width N*W exactly."""
    s = AblationShape(dim=32, n_experts=4, expert_dim=16)
    torch.manual_seed(0)
    moe = MoE(variant_config("dense_total", s).moe).eval()
    dense = FeedForward(32, 4 * 16)
    with torch.no_grad():
        shared = moe.shared_experts
        dense.w1.weight.copy_(torch.cat([shared.w1.weight, moe.experts.w1[0]]))
        dense.w3.weight.copy_(torch.cat([shared.w3.weight, moe.experts.w3[0]]))
        dense.w2.weight.copy_(torch.cat([shared.w2.weight, moe.experts.w2[0]], dim=1))
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(moe(x), dense(x))


def _router(n_routed=8, k=2, **kw):
    torch.manual_seed(1)
    return Router(MoEConfig(dim=16, moe_inter_dim=8, n_routed_experts=n_routed, n_activated_experts=k, **kw))


@pytest.mark.parametrize("kw", [{}, {"score_func": "sigmoid", "norm_topk_prob": True, "route_scale": 2.0,
                                     "use_routing_bias": True}])
def test_altered_router_skips_each_tokens_best_experts(kw):
    router = _router(**kw)
    if router.e_score_correction_bias is not None:
        router.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    x = torch.randn(12, 16)
    trained = router(x)
    same = AlteredRouter(router)(x)
    torch.testing.assert_close(same.indices_TK, trained.indices_TK)
    torch.testing.assert_close(same.weights_TK, trained.weights_TK)
    altered = AlteredRouter(router, skip_top=3, n_activated=3)(x)
    choice = trained.scores_TE.detach() + (router.e_score_correction_bias if "use_routing_bias" in kw else 0)
    cfg = router.cfg
    for t in range(12):  # per token: rank the experts, drop the first 3, take the next 3
        ranked = sorted(range(8), key=lambda e: -float(choice[t, e]))
        assert altered.indices_TK[t].tolist() == ranked[3:6]
        gates = trained.scores_TE[t, ranked[3:6]]
        if cfg.norm_topk_prob:
            gates = gates / gates.sum()
        torch.testing.assert_close(altered.weights_TK[t], gates * cfg.route_scale)
    with pytest.raises(ValueError, match="skip_top \\(7\\) \\+ n_activated \\(2\\) must be <= n_routed_experts"):
        AlteredRouter(router, skip_top=7)
    with pytest.raises(ValueError, match="without a group limit"):
        AlteredRouter(_router(n_expert_groups=2, n_limited_groups=1))


def test_altered_routing_drops_shared_adds_one_routed_and_restores():
    cfg = MoEConfig(dim=16, moe_inter_dim=8, n_routed_experts=7, n_activated_experts=3, n_shared_experts=1)
    torch.manual_seed(2)
    moe = MoE(cfg).eval()
    x = torch.randn(1, 6, 16)
    before = moe(x)
    gate, shared = moe.gate, moe.shared_experts
    with altered_routing(moe, extra=1, drop_shared=True):
        after = moe(x)
        assert moe.last_stats.tokens_per_expert.sum() == 6 * 4  # 3 + 1 routed experts per token
    assert moe.gate is gate and moe.shared_experts is shared
    torch.testing.assert_close(moe(x), before)
    # Reference: the top-4 routed experts, gates = their softmax scores, no shared expert.
    scores = gate(x[0]).scores_TE
    top = scores.topk(4, dim=-1)
    ref = torch.zeros(6, 16)
    for t in range(6):
        for g, e in zip(top.values[t], top.indices[t], strict=True):
            h = torch.nn.functional.silu(x[0, t] @ moe.experts.w1[e].T) * (x[0, t] @ moe.experts.w3[e].T)
            ref[t] += g * (h @ moe.experts.w2[e].T)
    torch.testing.assert_close(after[0], ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no shared experts"):
        with altered_routing(MoE(cfg.replace(n_shared_experts=0)), drop_shared=True):
            pass


def test_masked_counts():
    # gshard_x1.5 (8 experts, top-2) and deepseekmoe (31 routed, top-7) of N = 8: ratios k/8.
    assert masked_counts(8, 2, 8, 0.375) == [(0.0, 0), (0.125, 1), (0.25, 2), (0.375, 3)]
    assert masked_counts(31, 7, 8, 0.375) == [(0.0, 0), (0.125, 4), (0.25, 8), (0.375, 12)]
    assert masked_counts(4, 2, 4, 0.9) == [(0.0, 0), (0.25, 1), (0.5, 2)]  # K experts must remain


def test_balance_variants_change_only_their_balance_fields():
    shape = AblationShape()
    base = variant_config("deepseekmoe", shape).moe.to_dict()
    changed = {v: {k: val for k, val in variant_config(v, shape).moe.to_dict().items() if base[k] != val}
               for v in BALANCE_VARIANTS}
    assert changed == {
        "deepseekmoe_drop": {"capacity_factor": 1.0, "n_expert_groups": 31},  # a budget per routed expert
        "deepseekmoe_adaptive": {"capacity_factor": 1.0, "capacity_policy": "adaptive", "capacity_min": 0.75,
                                 "capacity_max": 1.5, "n_expert_groups": 31},  # target drop 0.01 is the default
        "deepseekmoe_entropy": {"entropy_loss_alpha": 0.05},
    }
    counts = {v: count_variant(variant_config(v, shape), seq_len=128) for v in ("deepseekmoe", *BALANCE_VARIANTS)}
    assert len(set(counts.values())) == 1  # the same parameters and compute
