"""The routing-entropy regulariser and the adaptive capacity factor: hand-computed values, brute-force checks,
and the layer's use of both."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_moe.config import MoEConfig
from deepseek_moe.moe import balance
from deepseek_moe.moe.all_layers import load_routing_state, routing_state, set_entropy_scale
from deepseek_moe.moe.capacity import capacity_for_drop_rate, update_capacity
from deepseek_moe.moe.dropping import group_budget
from deepseek_moe.moe.layer import MoE
from deepseek_moe.train.config import resolve_config
from deepseek_moe.train.schedule import entropy_scale

# ---- the entropy regulariser -------------------------------------------------------------------------------


def test_routing_entropy_by_hand() -> None:
    # E = 4. Token 1: uniform, H = ln 4 -> 1. Token 2: one-hot -> 0. Token 3: two halves, H = ln 2 -> 1/2.
    # Token 4: sigmoid-like scores that do not sum to 1, uniform after normalising -> 1.
    scores = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0],
                            [0.2, 0.2, 0.2, 0.2]]])
    assert float(balance.routing_entropy(scores)) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert float(balance.routing_entropy_loss(scores, 0.1)) == pytest.approx(0.1 * (1 - 2.5 / 4))
    mask = torch.tensor([[True, False, True, False]])  # padding counts nowhere
    assert float(balance.routing_entropy(scores, mask)) == pytest.approx((1 + 0.5) / 2)
    # E = 3, p = (0.5, 0.25, 0.25): H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2
    p = torch.tensor([[[0.5, 0.25, 0.25]]])
    assert float(balance.routing_entropy(p)) == pytest.approx(1.5 * math.log(2) / math.log(3))


def test_the_regulariser_spreads_routing_out() -> None:
    """Its sign: a gradient step on the loss alone raises the routing entropy of confident (peaked) routing."""
    torch.manual_seed(0)
    logits = (torch.randn(1, 16, 8) * 4).requires_grad_()
    before = float(balance.routing_entropy(logits.detach().softmax(-1)))
    balance.routing_entropy_loss(logits.softmax(-1), 1.0).backward()
    with torch.no_grad():
        after = float(balance.routing_entropy((logits - 1.0 * logits.grad).softmax(-1)))
    assert after > before
    assert torch.isfinite(logits.grad).all()


def test_one_hot_scores_give_finite_gradients() -> None:
    scores = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    balance.routing_entropy_loss(scores, 1.0).backward()
    assert torch.isfinite(scores.grad).all()


def _layer(**changes: object) -> MoE:
    torch.manual_seed(0)
    cfg = MoEConfig(dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2, n_expert_groups=4,
                    expert_loss_alpha=0.0, **changes)  # type: ignore[arg-type]
    return MoE(cfg).train()


def test_the_layer_adds_the_scaled_regulariser() -> None:
    x = torch.randn(2, 5, 16)
    layer = _layer(entropy_loss_alpha=0.3)
    layer(x)
    scores = layer.gate(x.reshape(-1, 16)).scores_TE
    assert scores is not None
    expected = 0.3 * (1 - balance.routing_entropy(scores.view(2, 5, -1)))
    assert float(layer.aux_loss) == pytest.approx(float(expected), rel=1e-6)
    assert layer.last_stats is not None and layer.last_stats.routing_entropy is not None
    set_entropy_scale(layer, 0.5)
    layer(x)
    assert float(layer.aux_loss) == pytest.approx(0.5 * float(expected), rel=1e-6)
    set_entropy_scale(layer, 0.0)
    layer(x)
    assert float(layer.aux_loss) == 0.0


def test_entropy_schedule_is_strongest_when_learned_routing_starts() -> None:
    cfg = resolve_config(assignments=["schedule.steps=100", "routing.uniform_steps=10",
                                      "routing.entropy_decay_fraction=0.2"])
    assert [entropy_scale(cfg, s) for s in (0, 10, 15, 20, 30, 99)] == pytest.approx([1, 1, 0.75, 0.5, 0, 0])
    constant = resolve_config(assignments=["schedule.steps=100", "routing.entropy_decay_fraction=null"])
    assert entropy_scale(constant, 99) == 1.0
    with pytest.raises(ValueError, match=r"entropy_decay_fraction \(0(\.0)?\) must be in \(0, 1\]"):
        resolve_config(assignments=["routing.entropy_decay_fraction=0"])
    with pytest.raises(ValueError, match=r"entropy_loss_alpha \(-1\) must be >= 0"):
        MoEConfig(dim=4, moe_inter_dim=4, n_routed_experts=2, n_activated_experts=1, entropy_loss_alpha=-1)


# ---- the adaptive capacity factor ----------------------------------------------------------------------------


def _dropped(load: list[float], factor: float) -> float:
    """What groups with these loads drop at this factor (ignoring protection), the slow way."""
    budget = factor * sum(load) / len(load)
    return sum(max(0.0, n - budget) for n in load)


def test_capacity_for_drop_rate_by_hand() -> None:
    load = torch.tensor([6.0, 2.0, 2.0, 2.0])  # A = 12 assignments over G = 4 groups: mean 3
    assert capacity_for_drop_rate(load, 0.0) == pytest.approx(2.0)  # max / mean: nothing dropped
    assert capacity_for_drop_rate(load, 1 / 12) == pytest.approx(5 * 4 / 12)  # budget 5: one dropped
    assert capacity_for_drop_rate(load, 0.5) == pytest.approx(0.5)  # budget 1.5: 4.5 + 3 * 0.5 = 6 dropped
    assert capacity_for_drop_rate(torch.tensor([3.0, 3.0]), 0.0) == pytest.approx(1.0)  # balanced
    with pytest.raises(ValueError, match="all loads are zero"):
        capacity_for_drop_rate(torch.zeros(4), 0.1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=12).filter(lambda xs: sum(xs) > 0),
       st.floats(0.0, 0.9))
def test_capacity_for_drop_rate_is_the_smallest_meeting_the_target(load: list[int], target: float) -> None:
    c = capacity_for_drop_rate(torch.tensor(load, dtype=torch.float64), target)
    total = sum(load)
    assert _dropped(load, c) <= target * total + 1e-9
    if c > 1e-9:  # any smaller factor drops more than the target allows
        assert _dropped(load, c * (1 - 1e-6) - 1e-9) > target * total - 1e-9


def test_update_capacity_moves_toward_the_measured_factor_within_bounds() -> None:
    layer = _layer(capacity_factor=1.2, capacity_policy="adaptive", capacity_min=1.0, capacity_max=1.5,
                   capacity_target_drop=0.0, capacity_update_rate=0.25)
    assert layer.capacity_factor == 1.2
    layer.capacity_counts.copy_(torch.tensor([6.0, 2.0, 2.0, 2.0]))  # c* = 2.0
    update_capacity(layer)
    assert layer.capacity_factor == pytest.approx(0.75 * 1.2 + 0.25 * 2.0)  # 1.4
    assert float(layer.capacity_counts.sum()) == 0.0  # counts reset
    layer.capacity_counts.copy_(torch.tensor([6.0, 2.0, 2.0, 2.0]))
    update_capacity(layer)
    assert layer.capacity_factor == 1.5  # 1.55 clipped to capacity_max
    layer.capacity_counts.copy_(torch.tensor([3.0, 3.0, 3.0, 3.0]))  # c* = 1.0
    for _ in range(30):
        layer.capacity_counts.copy_(torch.tensor([3.0, 3.0, 3.0, 3.0]))
        update_capacity(layer)
    assert layer.capacity_factor == pytest.approx(1.0, abs=1e-3)
    # no routed tokens, or the uniform warm-up: the factor stays
    update_capacity(layer)
    layer.uniform_routing = True
    layer.capacity_counts.copy_(torch.tensor([9.0, 1.0, 1.0, 1.0]))
    before = layer.capacity_factor
    update_capacity(layer)
    assert layer.capacity_factor == before


def test_the_layer_counts_group_loads_and_drops_against_the_adaptive_factor() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 7, 16)
    adaptive = _layer(capacity_factor=1.0, capacity_policy="adaptive", capacity_min=0.5, capacity_max=2.0)
    adaptive(x)
    routes = adaptive.gate(x.reshape(-1, 16)).indices_TK
    expected = torch.bincount(routes.flatten() // 2, minlength=4).double()  # 2 experts per group
    assert torch.equal(adaptive.capacity_counts, expected)
    # at factor 0.6 the adaptive layer drops what a fixed layer at 0.6 drops, output for output
    fixed = _layer(capacity_factor=0.6)
    fixed.load_state_dict(adaptive.state_dict())
    adaptive.capacity_now = 0.6
    adaptive._generator = None  # the same protected-sequence draws as the fresh fixed layer
    y_adaptive, y_fixed = adaptive(x), fixed(x)
    assert adaptive.last_stats is not None and fixed.last_stats is not None
    assert int(adaptive.last_stats.dropped) == int(fixed.last_stats.dropped) > 0
    torch.testing.assert_close(y_adaptive, y_fixed, rtol=0, atol=0)
    assert group_budget(0.6, 2, 21, 4) == math.ceil(0.6 * 2 * 21 / 4)


def test_capacity_state_round_trips_through_routing_state() -> None:
    a = _layer(capacity_factor=1.0, capacity_policy="adaptive")
    a.capacity_now = 1.37
    a.capacity_counts.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    b = _layer(capacity_factor=1.0, capacity_policy="adaptive")
    load_routing_state(b, routing_state(a))
    assert b.capacity_now == 1.37 and torch.equal(b.capacity_counts, a.capacity_counts)


@pytest.mark.parametrize(("changes", "message"), [
    ({"capacity_policy": "adaptive"}, r"capacity_policy \('adaptive'\) needs capacity_factor"),
    ({"capacity_policy": "adaptive", "capacity_factor": 3.0}, r"capacity_factor \(3.0\) must be within"),
    ({"capacity_policy": "adaptive", "capacity_factor": 1.0, "capacity_min": 0.0}, r"0 < capacity_min"),
    ({"capacity_policy": "adaptive", "capacity_factor": 1.0, "capacity_target_drop": 1.0},
     r"capacity_target_drop \(1.0\) must be in \[0, 1\)"),
    ({"capacity_policy": "adaptive", "capacity_factor": 1.0, "capacity_update_rate": 0.0},
     r"capacity_update_rate \(0.0\) must be in \(0, 1\]"),
    ({"capacity_policy": "dynamic"}, r"capacity_policy \('dynamic'\) must be one of 'fixed', 'adaptive'"),
])
def test_bad_capacity_configs_are_refused_naming_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MoEConfig(dim=4, moe_inter_dim=4, n_routed_experts=2, n_activated_experts=1, **changes)
