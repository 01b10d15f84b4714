"""The MoE layer's contract, routing invariants, dropping, uniform warm-up, bias update and statistics."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_moe import (
    MoE,
    MoEConfig,
    collect_aux_loss,
    load_routing_state,
    plot_routing_heatmap,
    routing_counts,
    routing_state,
    set_uniform_routing,
    update_routing_bias,
)
from deepseek_moe.moe.dropping import ProtectedDraw, capacity_keep_mask, group_budget

SMALL = dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2)


def test_shapes_and_2d_input_is_one_sequence():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(**SMALL, n_shared_experts=1)).eval()
    x = torch.randn(5, 16)
    y = moe(x)
    assert y.shape == x.shape
    torch.testing.assert_close(moe(x.unsqueeze(0)).squeeze(0), y)


@pytest.mark.parametrize("shape", [(16,), (1, 2, 3, 16), (2, 3, 15)])
def test_bad_input_shape_is_named(shape):
    moe = MoE(MoEConfig(**SMALL))
    with pytest.raises(ValueError, match=r"MoE input must have shape \(B, S, 16\)"):
        moe(torch.randn(*shape))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(n_activated_experts=9), r"n_activated_experts \(9\) must be <= n_routed_experts \(8\)"),
        (dict(n_expert_groups=3), r"n_expert_groups \(3\) must divide n_routed_experts \(8\)"),
        (dict(n_expert_groups=2, n_limited_groups=3), r"n_limited_groups \(3\) must be <= n_expert_groups \(2\)"),
        (dict(capacity_factor=0.0), r"capacity_factor \(0.0\) must be a positive number"),
        (dict(capacity_factor=-1.0), r"capacity_factor"),
        (dict(score_func="relu"), r"score_func \('relu'\) must be one of 'softmax', 'sigmoid'"),
        (dict(n_expert_groups=4, n_limited_groups=1, n_activated_experts=3), r"n_limited_groups \* experts per"),
        (dict(dim=0), r"dim \(0\) must be a positive integer"),
        (dict(protected_fraction=1.5), r"protected_fraction"),
    ],
)
def test_impossible_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{**SMALL, **changes})


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("m", "k_s"), [(1, 0), (2, 1), (4, 1), (4, 2)])
def test_fine_grained_segmentation_preserves_parameters_and_flops(m, k_s):
    dim, inter, n, k = 32, 64, 8, 2
    cfg = MoEConfig.from_conventional(dim=dim, inter_dim=inter, n_experts=n, top_k=k, segmentation=m, n_shared=k_s)
    assert cfg.n_routed_experts + cfg.n_shared_experts == m * n
    moe = MoE(cfg)
    expert_params = _count(moe.experts) + (_count(moe.shared_experts) if moe.shared_experts else 0)
    assert expert_params == n * 3 * dim * inter  # the conventional MoE's N experts
    activated_width = (cfg.n_activated_experts + cfg.n_shared_experts) * cfg.moe_inter_dim
    assert activated_width == k * inter  # same FLOPs per token as its top-K


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([(4, 1, "max"), (4, 2, "max"), (8, 3, "top2_sum"), (2, 1, "top2_sum")]))
def test_group_limit_is_never_violated(seed, groups):
    n_groups, limit, group_score = groups
    torch.manual_seed(seed)
    cfg = MoEConfig(dim=16, moe_inter_dim=8, n_routed_experts=16, n_activated_experts=min(4, limit * 16 // n_groups),
                    n_expert_groups=n_groups, n_limited_groups=limit, group_score_func=group_score,
                    score_func="sigmoid" if group_score == "top2_sum" else "softmax",
                    use_routing_bias=group_score == "top2_sum")
    moe = MoE(cfg)
    x = torch.randn(3, 20, 16)
    for uniform in (False, True):
        moe.uniform_routing = uniform
        routing = moe.gate.uniform(60, moe.generator(x.device), x.device) if uniform else moe.gate(x.view(-1, 16))
        groups_used = (routing.indices_TK // (16 // n_groups)).tolist()
        assert max(len(set(row)) for row in groups_used) <= limit
        assert all(len(set(row)) == cfg.n_activated_experts for row in routing.indices_TK.tolist())


def _dropping_moe(**changes):
    cfg = MoEConfig(**{**SMALL, "n_expert_groups": 4, "n_limited_groups": 4, "capacity_factor": 0.5, **changes})
    torch.manual_seed(1)
    return MoE(cfg)


def test_capacity_is_honoured_and_dropped_tokens_keep_shared_experts():
    moe = _dropping_moe(protected_fraction=0.0, n_shared_experts=1).train()
    B, S = 4, 16
    x = torch.randn(B, S, 16)
    y = moe(x)
    budget = group_budget(0.5, 2, B * S, 4)
    assert budget == 16
    dropped = int(moe.last_stats.dropped)
    assert dropped >= B * S * 2 - 4 * budget  # at most `budget` kept per group
    # A token whose every assignment is dropped still gets the shared experts' output.
    routing = moe.gate(x.view(-1, 16))
    from deepseek_moe.moe.dispatch import DropPlan, drop_over_budget

    keep = drop_over_budget(routing, DropPlan(0.5, 4, torch.zeros(B * S, dtype=torch.bool)), 8).view(B * S, 2)
    kept_per_group = torch.bincount((routing.indices_TK.view(-1) // 2)[keep.view(-1)], minlength=4)
    assert kept_per_group.max() <= budget
    fully_dropped = (~keep).all(dim=1).nonzero().flatten()
    assert len(fully_dropped) > 0
    t = int(fully_dropped[0])
    torch.testing.assert_close(y.view(-1, 16)[t], moe.shared_experts(x.view(-1, 16)[t]))


def test_protected_sequences_are_never_dropped():
    moe = _dropping_moe(protected_fraction=0.5, capacity_factor=0.25).train()
    x = torch.randn(4, 12, 16)
    draw = ProtectedDraw(1)
    protected = draw.sequences(4, 0.5)
    assert 0 < int(protected.sum()) < 4  # the test needs both kinds
    y_train = moe(x, protected=draw)
    assert int(moe.last_stats.dropped) > 0
    y_eval = moe.eval()(x)  # no dropping at inference
    torch.testing.assert_close(y_train[protected], y_eval[protected])
    assert not torch.allclose(y_train[~protected], y_eval[~protected])


def test_keep_mask_by_hand():
    # Group 0 gets assignments with affinities .9 .1 .5 (the .1 one protected), budget 2: keep .1 and .9.
    affinity = torch.tensor([0.9, 0.1, 0.5, 0.7])
    group = torch.tensor([0, 0, 0, 1])
    protected = torch.tensor([False, True, False, False])
    assert capacity_keep_mask(affinity, group, protected, budget=2, n_groups=2).tolist() == [True, True, False, True]
    assert capacity_keep_mask(affinity, group, protected, budget=0, n_groups=2).tolist() == [False, True, False, False]


def test_no_dropping_at_inference_unless_asked():
    x = torch.randn(4, 12, 16)
    moe = _dropping_moe(protected_fraction=0.0).eval()
    moe(x)
    assert int(moe.last_stats.dropped) == 0
    moe = _dropping_moe(protected_fraction=0.0, drop_at_inference=True).eval()
    moe(x)
    assert int(moe.last_stats.dropped) > 0


def test_uniform_routing_warm_up():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(**SMALL, uniform_routing=True, seed=7)).train()
    x = torch.randn(4, 64, 16, requires_grad=True)
    y = moe(x)
    assert float(moe.aux_loss) == 0.0
    y.sum().backward()
    assert moe.gate.weight.grad is None  # no router gradient
    counts = moe.last_stats.tokens_per_expert.float()
    assert counts.sum() == 4 * 64 * 2
    assert counts.std() / counts.mean() < 0.25  # uniform: 64 expected per expert
    # Gates are 1/K: the output is the mean of the chosen experts' outputs.
    again = MoE(MoEConfig(**SMALL, uniform_routing=True, seed=7))
    again.load_state_dict(moe.state_dict())
    torch.testing.assert_close(again(x), y)  # the same seed draws the same experts
    routing = MoE(MoEConfig(**SMALL)).gate.uniform(10, torch.Generator().manual_seed(0), x.device)
    assert torch.all(routing.weights_TK == 0.5)


def test_uniform_warm_up_leaves_the_routing_bias_and_its_counts_alone():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(**SMALL, score_func="sigmoid", use_routing_bias=True, norm_topk_prob=True,
                        uniform_routing=True, bias_update_speed=0.01)).train()
    x = torch.randn(2, 32, 16)
    for _ in range(3):  # three warm-up steps of two micro-batches
        moe(x)
        moe(x)
        update_routing_bias(moe)
    assert torch.count_nonzero(moe.gate.e_score_correction_bias) == 0
    assert torch.count_nonzero(moe.bias_counts) == 0
    set_uniform_routing(moe, False)  # stage 2: the router's own choices count and move the bias
    moe(x)
    assert moe.bias_counts.sum() == 2 * 32 * 2
    update_routing_bias(moe)
    assert torch.count_nonzero(moe.gate.e_score_correction_bias) > 0


def test_router_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(**SMALL, n_shared_experts=1)).train()
    x = torch.randn(2, 32, 16)
    reference = moe.gate(x.view(-1, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = moe.gate(x.view(-1, 16))
        y = moe(x)  # the whole layer runs under autocast too
    assert routing.scores_TE.dtype == torch.float32 and routing.weights_TK.dtype == torch.float32
    torch.testing.assert_close(routing.scores_TE, reference.scores_TE, rtol=1e-6, atol=1e-7)
    assert torch.equal(routing.indices_TK, reference.indices_TK)
    assert torch.isfinite(y).all()


def test_no_group_limit_unless_asked():
    cfg = MoEConfig(**SMALL, n_expert_groups=4)
    assert cfg.n_limited_groups == 4 and not cfg.group_limited  # M = G by default
    torch.manual_seed(0)
    routing = MoE(cfg).gate(torch.randn(200, 16))
    assert max(len(set((row // 2).tolist())) for row in routing.indices_TK) == 2  # K=2 experts in 2 groups
    # "No limit" survives a change of G (replace, or a dict round trip as train overrides make); a limit stays.
    assert cfg.replace(n_expert_groups=2).n_limited_groups == 2
    assert MoEConfig(**{**cfg.to_dict(), "n_expert_groups": 8}).n_limited_groups == 8
    limited = MoEConfig(**SMALL, n_expert_groups=4, n_limited_groups=1)
    assert limited.replace(n_expert_groups=2).n_limited_groups == 1
    assert MoEConfig(**limited.to_dict()) == limited and MoEConfig(**cfg.to_dict()) == cfg
    # A config.json written before this default changed (M stated, even as 1) loads as written.
    old = {**dataclasses.asdict(limited), "n_expert_groups": 1, "n_limited_groups": 1}
    assert MoEConfig(**old).n_limited_groups == 1
    conventional = MoEConfig.from_conventional(dim=16, inter_dim=32, n_experts=8, top_k=2, segmentation=2,
                                               n_expert_groups=4)
    assert conventional.n_limited_groups == 4


def test_aux_loss_only_in_training_and_collected():
    torch.manual_seed(0)
    model = torch.nn.Sequential(MoE(MoEConfig(**SMALL)), MoE(MoEConfig(**SMALL, seq_loss_alpha=0.01)))
    x = torch.randn(2, 6, 16)
    model.train()(x)
    total = collect_aux_loss(model)
    assert total.requires_grad and float(total.detach()) > 0
    torch.testing.assert_close(total, model[0].aux_loss + model[1].aux_loss)
    model.eval()(x)
    assert float(collect_aux_loss(model)) == 0.0


def test_routing_bias_moves_toward_balance_and_only_chooses():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(**SMALL, score_func="sigmoid", use_routing_bias=True, norm_topk_prob=True,
                        expert_loss_alpha=0.0, bias_update_speed=0.01)).train()
    x = torch.randn(2, 32, 16)
    moe(x)
    moe(x)  # two micro-batches before one optimizer step
    counts = moe.bias_counts.clone()
    assert counts.sum() == 2 * 2 * 64
    update_routing_bias(moe)
    expected = 0.01 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(moe.gate.e_score_correction_bias, expected)
    assert moe.bias_counts.sum() == 0
    # The bias changes which experts are chosen, never the gate values of a chosen expert.
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.tensor([5.0, 5.0] + [0.0] * 6))
    routing = moe.gate(x.view(-1, 16))
    assert set(routing.indices_TK.flatten().tolist()) == {0, 1}
    s = torch.sigmoid(x.view(-1, 16) @ moe.gate.weight.t())[:, :2]
    torch.testing.assert_close(routing.weights_TK.sort(dim=1).values, (s / s.sum(1, keepdim=True)).sort(dim=1).values)


def test_routing_state_round_trip_reproduces_uniform_draws():
    moe = MoE(MoEConfig(**SMALL, uniform_routing=True)).train()
    x = torch.randn(2, 8, 16)
    moe(x)
    state = routing_state(moe)
    y1 = moe(x)
    load_routing_state(moe, state)
    torch.testing.assert_close(moe(x), y1)
    set_uniform_routing(moe, False)
    assert not moe.uniform_routing


def test_stats_and_heatmap(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(MoE(MoEConfig(**SMALL)), MoE(MoEConfig(**SMALL)))
    model(torch.randn(2, 10, 16))
    stats = model[0].last_stats
    counts = stats.tokens_per_expert.float()
    assert stats.imbalance_max_mean == pytest.approx(float(counts.max() / counts.mean()))
    assert stats.imbalance_cv == pytest.approx(float(counts.std(unbiased=False) / counts.mean()))
    assert not math.isnan(stats.dropped_fraction)
    path = plot_routing_heatmap(routing_counts(model), tmp_path / "heat.png")
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="2-D"):
        plot_routing_heatmap(torch.ones(3), tmp_path / "bad.png")


def test_deterministic_for_a_seed():
    def run():
        torch.manual_seed(3)
        moe = MoE(MoEConfig(**SMALL, capacity_factor=0.5, n_expert_groups=2)).train()
        x = torch.randn(3, 9, 16, requires_grad=True)
        y = moe(x)
        (y.square().sum() + moe.aux_loss).backward()
        return y.detach(), x.grad
    a, b = run(), run()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_deterministic_combine_equals_index_add():
    # The CUDA combine (one slot per row, then a sum) run on CPU against the CPU one (index_add).
    from deepseek_moe.moe.dispatch import combine

    torch.manual_seed(0)
    token_A = torch.randint(0, 7, (40,))
    token_A[:3] = 6  # uneven rows per token, some tokens with none
    y_AD = torch.randn(40, 5, requires_grad=True)
    fast = combine(y_AD, token_A, 9, deterministic=False)
    slots = combine(y_AD, token_A, 9, deterministic=True)
    torch.testing.assert_close(slots, fast)
    (g_fast,) = torch.autograd.grad(fast.sum(), y_AD)
    (g_slots,) = torch.autograd.grad(slots.sum(), y_AD)
    torch.testing.assert_close(g_slots, g_fast)


def test_combine_keeps_only_the_indices_for_the_backward():
    # autograd's own index_add saves its (A, D) source; combine's gradient needs only token_A.
    from deepseek_moe.moe.dispatch import combine

    torch.manual_seed(0)
    token_A = torch.randint(0, 7, (40,))
    y_AD = torch.randn(40, 5, dtype=torch.float64, requires_grad=True)
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y_TD = combine(y_AD, token_A, 9, deterministic=False)
    assert saved == [(40,)]
    reference = torch.zeros(9, 5, dtype=torch.float64).index_add(0, token_A, y_AD)
    assert torch.equal(y_TD, reference)
    dy = torch.randn(9, 5, dtype=torch.float64)
    assert torch.equal(torch.autograd.grad(y_TD, y_AD, dy)[0], torch.autograd.grad(reference, y_AD, dy)[0])
    assert torch.autograd.gradcheck(lambda y: combine(y, token_A, 9, deterministic=False), (y_AD,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_layer_matches_cpu():
    torch.manual_seed(0)
    cfg = MoEConfig(dim=64, moe_inter_dim=32, n_routed_experts=16, n_activated_experts=4, n_shared_experts=1,
                    n_expert_groups=4, n_limited_groups=2, capacity_factor=1.0,
                    protected_fraction=0.0)  # CPU and CUDA generators draw different sequences
    moe = MoE(cfg).train()
    x = torch.randn(2, 33, 64)
    y_cpu = moe(x)
    moe_gpu = MoE(cfg).cuda().train()
    moe_gpu.load_state_dict(moe.state_dict())
    torch.testing.assert_close(moe_gpu(x.cuda()).cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    y1, y2 = moe_gpu(x.cuda()), moe_gpu(x.cuda())
    assert torch.equal(y1, y2)


def test_reset_parameters_after_meta_build():
    cfg = MoEConfig(**SMALL, use_routing_bias=True, score_func="sigmoid")
    with torch.device("meta"):
        moe = MoE(cfg)
    moe = moe.to_empty(device="cpu")
    moe.reset_parameters()
    assert moe.experts.w1.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.count_nonzero(moe.gate.e_score_correction_bias) == 0 and torch.count_nonzero(moe.bias_counts) == 0
    assert torch.isfinite(moe(torch.randn(3, 16))).all()
