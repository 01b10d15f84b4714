"""The fast layer against the slow per-token reference: outputs and gradients, over random configs."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from deepseek_moe import MoE, MoEConfig
from deepseek_moe.kernels import mkl_grouped
from deepseek_moe.moe.dropping import ProtectedDraw
from deepseek_moe.moe.experts import RoutedExperts
from deepseek_moe.moe.reference import reference_forward, top_k_margin


@st.composite
def layer_cases(draw):
    n_groups = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.integers(1, 4))
    n_limited = draw(st.integers(1, n_groups))
    k = draw(st.integers(1, min(n_limited * per_group, 4)))
    score_func = draw(st.sampled_from(["softmax", "sigmoid"]))
    group_score_func = draw(st.sampled_from(["max", "top2_sum"])) if per_group >= 2 else "max"
    capacity = draw(st.one_of(st.none(), st.floats(0.25, 2.0)))
    cfg = MoEConfig(
        dim=8, moe_inter_dim=draw(st.integers(2, 6)), n_routed_experts=n_groups * per_group,
        n_activated_experts=k, n_shared_experts=draw(st.integers(0, 2)), n_expert_groups=n_groups,
        n_limited_groups=n_limited, group_score_func=group_score_func, score_func=score_func,
        route_scale=draw(st.sampled_from([1.0, 2.5])), norm_topk_prob=draw(st.booleans()),
        use_routing_bias=draw(st.booleans()), capacity_factor=capacity,
        protected_fraction=draw(st.sampled_from([0.0, 0.5])), seed=draw(st.integers(0, 2**16)),
    )
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 6)))
    # Left padding of each sequence (0: none); a sequence may be all padding.
    padding = [draw(st.integers(0, shape[1])) for _ in range(shape[0])] if draw(st.booleans()) else None
    if draw(st.booleans()) and shape[0] == 1:
        shape = shape[1:]  # a single (S, D) sequence
    return cfg, shape, padding, draw(st.integers(0, 2**31 - 1))


def _build(cfg, shape, seed):
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_(std=1.0)  # spread affinities so that choices are clear-cut
        if moe.gate.e_score_correction_bias is not None:
            moe.gate.e_score_correction_bias.normal_(std=0.1)
        for p in moe.experts.parameters():
            p.normal_(std=0.3)
    x = torch.randn(*shape, cfg.dim)
    return moe, x


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer_cases())
def test_fast_path_matches_reference(case):
    cfg, shape, padding, seed = case
    moe, x = _build(cfg, shape, seed)
    assume(top_k_margin(moe, x) > 1e-4)
    dropping = cfg.capacity_factor is not None
    moe.train(dropping)
    token_mask = None
    if padding is not None:
        S = shape[-1]
        token_mask = torch.tensor([[s >= pad for s in range(S)] for pad in padding]).view(shape)
        assume(bool(token_mask.any()))  # all padding has no graph to compare gradients in

    draw = ProtectedDraw(seed)
    x_fast = x.clone().requires_grad_(True)
    y_fast = moe(x_fast, token_mask=token_mask, protected=draw)
    n_seq = x.shape[0] if x.dim() == 3 else 1
    protected = draw.sequences(n_seq, cfg.protected_fraction).nonzero().flatten().tolist()

    x_ref = x.clone().requires_grad_(True)
    y_ref = reference_forward(moe, x_ref, token_mask=token_mask, protected_sequences=protected, drop=dropping)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)

    # O(0.1) upstream gradients: fp32 sums of O(1) terms would otherwise round past the absolute 1e-6.
    upstream = 0.1 * torch.randn_like(y_fast)
    params = [p for p in moe.parameters()]
    grads_fast = torch.autograd.grad((y_fast * upstream).sum(), [x_fast, *params], allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * upstream).sum(), [x_ref, *params], allow_unused=True)
    for g_fast, g_ref in zip(grads_fast, grads_ref, strict=True):
        if g_ref is None:
            assert g_fast is None or torch.count_nonzero(g_fast) == 0
            continue
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("counts", [[4, 0, 7, 1, 0, 9, 2, 4], [0] * 7 + [27]])
def test_the_expert_paths_agree(counts):
    """MKL's batched GEMM (fp32 on CPU), grouped_mm and the per-expert loop: outputs and all gradients,
    experts without rows included."""
    torch.manual_seed(0)
    experts = RoutedExperts(8, 16, 8)
    counts_E = torch.tensor(counts)
    x = torch.randn(int(counts_E.sum()), 16)
    gates = torch.rand(x.shape[0])
    results = {}
    for path, (mkl, grouped) in {"mkl": (True, True), "grouped_mm": (False, True), "loop": (False, False)}.items():
        if path == "mkl" and not mkl_grouped.available():
            continue
        experts.use_mkl_batch, experts.use_grouped_mm = mkl, grouped
        xg = x.clone().requires_grad_(True)
        y = experts(xg, counts_E, gates)
        results[path] = (y, *torch.autograd.grad(y.square().sum(), [xg, *experts.parameters()]))
    ref = results.pop("loop")
    for got in results.values():
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    cfg = MoEConfig(dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2, n_shared_experts=1)
    moe = MoE(cfg)
    x = torch.randn(2, 5, 32)
    y32 = moe(x)
    y16 = moe.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.02)
