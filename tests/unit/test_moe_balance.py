"""Balance losses against values computed by hand (DeepSeek-V2 §2.2, DeepSeek-V3 §2.1.2)."""

import pytest
import torch

from deepseek_moe.moe import balance

# One sequence of two tokens, four experts on two devices ({0, 1} and {2, 3}), K = 2.
SCORES = torch.tensor([[[0.4, 0.1, 0.3, 0.2], [0.3, 0.5, 0.1, 0.1]]])
INDICES = torch.tensor([[[0, 2], [1, 0]]])
# counts [2, 1, 1, 0]; f = E/(K T) * counts = [2, 1, 1, 0]; P = [0.35, 0.30, 0.20, 0.15]


def test_expert_level_by_hand():
    # sum f P = 2*0.35 + 1*0.30 + 1*0.20 + 0 = 1.2
    assert balance.expert_balance_loss(SCORES, INDICES, alpha=0.003).item() == pytest.approx(0.003 * 1.2)


def test_device_level_by_hand():
    # f' = [mean(2, 1), mean(1, 0)] = [1.5, 0.5]; P' = [0.65, 0.35]; sum = 0.975 + 0.175 = 1.15
    assert balance.device_balance_loss(SCORES, INDICES, n_groups=2, alpha=0.05).item() == pytest.approx(0.05 * 1.15)


def test_communication_by_hand():
    # token 0 reaches devices {0, 1}, token 1 only {0}; f'' = D/(M T) * [2, 1] = 0.5 * [2, 1]; P'' = [0.65, 0.35]
    loss = balance.communication_balance_loss(SCORES, INDICES, n_groups=2, n_limited=2, alpha=0.02)
    assert loss.item() == pytest.approx(0.02 * (1.0 * 0.65 + 0.5 * 0.35))


def test_sequence_wise_normalises_scores_per_token():
    # sigmoid-like scores summing to 2 per token normalise to SCORES, so the loss is SCORES' expert loss (1.2),
    # while the plain expert loss on the raw scores is f . P_raw = 2*0.7 + 0.6 + 0.4 = 2.4
    raw = SCORES * 2
    assert balance.sequence_balance_loss(raw, INDICES, alpha=1.0).item() == pytest.approx(1.2)
    assert balance.expert_balance_loss(raw, INDICES, alpha=1.0).item() == pytest.approx(2.4)


def test_per_sequence_mean_differs_from_batch_form():
    # The two tokens as two sequences of one token each: per sequence f = 2 * counts.
    scores = SCORES.view(2, 1, 4)
    indices = INDICES.view(2, 1, 2)
    # sequence A: f [2,0,2,0] . [0.4,0.1,0.3,0.2] = 1.4; B: f [2,2,0,0] . [0.3,0.5,0.1,0.1] = 1.6; mean 1.5
    assert balance.expert_balance_loss(scores, indices, alpha=1.0).item() == pytest.approx(1.5)
    assert balance.expert_balance_loss(scores.view(1, 2, 4), indices.view(1, 2, 2), 1.0).item() == pytest.approx(1.2)


def test_perfect_balance_gives_alpha():
    # Uniform affinities and uniform selection: f_i = 1, P_i = 1/E, so the loss is alpha (its minimum).
    E, K, S = 4, 2, 4
    scores = torch.full((1, S, E), 1 / E)
    indices = torch.tensor([[[0, 1], [2, 3], [0, 2], [1, 3]]])
    assert balance.expert_balance_loss(scores, indices, alpha=0.1).item() == pytest.approx(0.1)
    assert balance.selection_counts(indices, E).tolist() == [[2, 2, 2, 2]]
    del K


def test_loss_gradient_flows_through_affinities_only():
    scores = SCORES.clone().requires_grad_(True)
    balance.expert_balance_loss(scores, INDICES, alpha=1.0).backward()
    # dL/ds_{i,t} = f_i / T
    torch.testing.assert_close(scores.grad[0, 0], torch.tensor([2.0, 1.0, 1.0, 0.0]) / 2)


@pytest.mark.parametrize(("n_groups", "n_limited", "expected"), [
    # G=4 groups of one expert, M=2: reached [2, 1, 1, 0]; f'' = G/(M T) * reached = [2, 1, 1, 0];
    # P'' = P = [0.35, 0.30, 0.20, 0.15]: sum 0.7 + 0.3 + 0.2 = 1.2 (swapping G and M would give 0.3).
    (4, 2, 1.2),
    # G=2 groups {0, 1} {2, 3}, M=1: reached [2, 1]; f'' = 2/(1*2) * [2, 1] = [2, 1]; P'' = [0.65, 0.35]:
    # 1.3 + 0.35 = 1.65 (swapped: 0.4125).
    (2, 1, 1.65),
])
def test_communication_by_hand_with_d_unequal_m(n_groups, n_limited, expected):
    loss = balance.communication_balance_loss(SCORES, INDICES, n_groups=n_groups, n_limited=n_limited, alpha=0.02)
    assert loss.item() == pytest.approx(0.02 * expected)
