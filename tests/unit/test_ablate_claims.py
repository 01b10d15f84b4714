"""The paired-by-seed claim verdicts against hand-computed values."""

import math

import pytest

from deepseek_moe.ablate.claims import evaluate_claims, paired


def test_paired_statistics_by_hand():
    # Δ = -0.03, -0.01, -0.02: mean -0.02, sample sd 0.01, SE 0.01/sqrt(3) = 0.005774, t = -3.464 < 4.303.
    r = paired([-0.03, -0.01, -0.02], "lower")
    assert r["mean"] == pytest.approx(-0.02)
    assert r["se"] == pytest.approx(0.01 / math.sqrt(3))
    assert r["t"] == pytest.approx(-2 * math.sqrt(3))
    assert r["t95"] == pytest.approx(4.303)
    assert r["verdict"] == "not resolved"
    # Tighter: Δ = -0.021, -0.019, -0.020: SE 0.000577, t = -34.6: separated, in the expected direction.
    assert paired([-0.021, -0.019, -0.020], "lower")["verdict"] == "reproduced"
    assert paired([0.021, 0.019, 0.020], "lower")["verdict"] == "contradicted"
    assert paired([0.021, 0.019, 0.020], "higher")["verdict"] == "reproduced"
    assert paired([0.01, -0.01, 0.0], "equal")["verdict"] == "consistent: not separated from zero"
    assert paired([-0.021, -0.019, -0.020], "equal")["verdict"] == "not reproduced: a is lower"
    one = paired([-0.5], "lower")
    assert one["se"] is None and one["verdict"] == "not resolved (one seed)"


def test_claims_pair_variants_by_seed():
    # gshard - dense per seed: (5.0-5.1, 4.0-4.1) = (-0.1, -0.1): zero spread, so t is infinite: reproduced,
    # although the two means' own spreads (0.5 each over seeds) overlap completely.
    analyses = {"dense": [{"val_loss": 5.1}, {"val_loss": 4.1}], "gshard": [{"val_loss": 5.0}, {"val_loss": 4.0}]}
    (c,) = evaluate_claims(analyses)
    assert (c["a"], c["b"]) == ("gshard", "dense")
    assert c["deltas"] == pytest.approx([-0.1, -0.1])
    assert c["verdict"] == "reproduced"


def test_redundancy_and_shared_expert_claims():
    red = lambda l0, l1: [[0.0, 0, l0], [0.25, 2, l1]]  # noqa: E731
    analyses = {
        "deepseekmoe": [{"val_loss": 5.0, "redundancy": red(5.0, 5.3), "analysis_loss": 5.0,
                         "shared_disabled_loss": 5.4},
                        {"val_loss": 5.1, "redundancy": red(5.1, 5.5), "analysis_loss": 5.1,
                         "shared_disabled_loss": 5.6}],
        "gshard_x1.5": [{"val_loss": 5.0, "redundancy": red(5.0, 5.1)},
                        {"val_loss": 5.1, "redundancy": red(5.1, 5.2)}],
    }
    claims = {c["claim"][:30]: c for c in evaluate_claims(analyses)}
    equal = next(c for c in claims.values() if c["expect"] == "equal")
    assert equal["deltas"] == [0.0, 0.0] and equal["verdict"].startswith("consistent")
    sens = next(c for c in claims.values() if "masking" in c["claim"])
    assert sens["deltas"] == pytest.approx([0.3 - 0.1, 0.4 - 0.1])  # DeepSeekMoE's increase minus GShard x1.5's
    shared = next(c for c in claims.values() if "shared expert is not" in c["claim"])
    assert shared["deltas"] == pytest.approx([0.4, 0.5])


def test_balance_claims_pair_their_variants_by_seed():
    analyses = {"deepseekmoe": [{"val_loss": 4.00}, {"val_loss": 3.00}],
                "deepseekmoe_drop": [{"val_loss": 4.10}, {"val_loss": 3.20}],
                "deepseekmoe_adaptive": [{"val_loss": 4.05}, {"val_loss": 3.10}]}
    claims = {(c["a"], c["b"]): c for c in evaluate_claims(analyses)}
    assert set(claims) == {("deepseekmoe_adaptive", "deepseekmoe_drop"), ("deepseekmoe_drop", "deepseekmoe")}
    assert claims["deepseekmoe_adaptive", "deepseekmoe_drop"]["deltas"] == pytest.approx([-0.05, -0.10])
    assert claims["deepseekmoe_drop", "deepseekmoe"]["deltas"] == pytest.approx([0.10, 0.20])
    assert claims["deepseekmoe_drop", "deepseekmoe"]["expect"] == "equal"
