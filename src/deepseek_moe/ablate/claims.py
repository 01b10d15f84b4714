"""The paper's claims as paired comparisons over seeds.

Two variants trained with the same seed see the same data in the same order, so the difference of their losses at
one seed removes most of the seed-to-seed spread; comparing the two means with their separate spreads would throw
that pairing away. For each claim: the per-seed differences, their mean, the standard error of the mean, and a
two-sided paired t-test at 95% (with 3 seeds a difference must be about 4.3 standard errors from zero to count).
One seed resolves nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom; beyond that 2.0 is within 5% of the truth.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t95(df: int) -> float:
    return _T95[df - 1] if df <= len(_T95) else 2.0


@dataclass(frozen=True)
class Claim:
    """``a`` has a lower loss than ``b`` (``expect="lower"``), or about the same (``expect="equal"``)."""

    a: str
    b: str
    expect: Literal["lower", "equal"]
    says: str


# DeepSeekMoE paper (Dai et al., 2024), §4.2-4.5; Δ = loss(a) - loss(b).
CLAIMS = (
    Claim("gshard", "dense", "lower", "an MoE layer beats a dense FFN of the same activated width"),
    Claim("shared", "gshard", "lower", "path step 1: isolating one shared expert lowers the loss"),
    Claim("fine_grained_m2", "shared", "lower", "path step 2: segmenting experts (m = 2) lowers it further"),
    Claim("deepseekmoe", "fine_grained_m2", "lower", "path step 3: finer segmentation (m = 4) lowers it again"),
    Claim("deepseekmoe", "fine_grained_only", "lower", "shared-expert isolation helps on top of segmentation"),
    Claim("deepseekmoe", "gshard", "lower", "DeepSeekMoE beats GShard at the same compute"),
    Claim("deepseekmoe", "gshard_x1.5", "equal", "DeepSeekMoE matches GShard with 1.5x the expert compute"),
    Claim("dense_total", "deepseekmoe", "lower", "a dense FFN with all the parameters is the upper bound"),
)


# The balance variants (issue 25), each against the run it changes; Δ = loss(a) - loss(b), reported whatever its
# sign: what the design expects, not something the paper measured.
BALANCE_CLAIMS = (
    Claim("deepseekmoe_adaptive", "deepseekmoe_drop", "lower",
          "an adaptive capacity factor loses less to dropping than a fixed factor of 1.0"),
    Claim("deepseekmoe_drop", "deepseekmoe", "equal", "dropping at capacity 1.0 costs little loss (DeepSeek-V2)"),
    Claim("deepseekmoe_entropy", "deepseekmoe", "lower",
          "the routing-entropy regulariser (strongest early) lowers the final loss"),
)


def paired(deltas: list[float], expect: Literal["lower", "equal", "higher"]) -> dict[str, Any]:
    """Mean, standard error, t and a verdict for per-seed differences Δ (expected < 0, ≈ 0 or > 0)."""
    n = len(deltas)
    mean = sum(deltas) / n
    if n < 2:
        return {"deltas": deltas, "mean": mean, "se": None, "t": None, "t95": None,
                "verdict": "not resolved (one seed)"}
    sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (n - 1))
    se = sd / math.sqrt(n)
    t = mean / se if se > 0 else math.copysign(math.inf, mean) if mean else 0.0
    crit = t95(n - 1)
    separated = abs(t) > crit
    if expect == "equal":
        verdict = ("consistent: not separated from zero" if not separated
                   else "not reproduced: a is lower" if mean < 0 else "not reproduced: a is higher")
    else:
        want_negative = expect == "lower"
        if not separated:
            verdict = "not resolved"
        elif (mean < 0) == want_negative:
            verdict = "reproduced"
        else:
            verdict = "contradicted"
    return {"deltas": deltas, "mean": mean, "se": se, "t": t, "t95": crit, "verdict": verdict}


def _per_seed(analyses: dict[str, list[dict[str, Any]]], variant: str, key: str) -> list[float]:
    return [float(r[key]) for r in analyses[variant]]


def evaluate_claims(analyses: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every claim whose variants were trained, plus the §4.5 ones when their analyses exist.

    ``analyses[variant]`` is one dict per seed, in the same seed order for every variant (``run._analyse_all``).
    """
    out = []
    for c in (*CLAIMS, *BALANCE_CLAIMS):
        if c.a not in analyses or c.b not in analyses:
            continue
        a, b = _per_seed(analyses, c.a, "val_loss"), _per_seed(analyses, c.b, "val_loss")
        out.append({"claim": c.says, "a": c.a, "b": c.b, "expect": c.expect,
                    **paired([x - y for x, y in zip(a, b, strict=True)], c.expect)})
    red = [v for v in ("deepseekmoe", "gshard_x1.5") if v in analyses and "redundancy" in analyses[v][0]]
    if len(red) == 2:
        # Sensitivity: loss with the largest masked ratio minus the unmasked loss, per seed.
        sens = {v: [r["redundancy"][-1][2] - r["redundancy"][0][2] for r in analyses[v]] for v in red}
        out.append({"claim": "§4.5: masking its top routed experts hurts DeepSeekMoE more than GShard x1.5 "
                             "(its experts are less redundant)",
                    "a": "deepseekmoe", "b": "gshard_x1.5", "expect": "higher", "measure": "loss increase at the "
                    "largest masked ratio",
                    **paired([x - y for x, y in zip(sens["deepseekmoe"], sens["gshard_x1.5"], strict=True)],
                             "higher")})
    if "deepseekmoe" in analyses and "shared_disabled_loss" in analyses["deepseekmoe"][0]:
        runs = analyses["deepseekmoe"]
        out.append({"claim": "§4.5: the shared expert is not replaceable by one more routed expert",
                    "a": "deepseekmoe (shared off, +1 routed)", "b": "deepseekmoe", "expect": "higher",
                    **paired([r["shared_disabled_loss"] - r["analysis_loss"] for r in runs], "higher")})
    return out


def claims_markdown(claims: list[dict[str, Any]]) -> list[str]:
    lines = ["## The paper's claims, paired by seed", "",
             "Δ = loss(a) − loss(b) per seed (same data order and router draws within a seed); mean ± standard "
             "error; a claim counts as reproduced only when a two-sided paired t-test at 95% separates Δ from zero.",
             "", "| claim | a | b | Δ per seed | mean Δ ± SE | t (95% bound) | verdict |",
             "|---|---|---|---|---:|---:|---|"]
    for c in claims:
        per_seed = ", ".join(f"{d:+.4f}" for d in c["deltas"])
        se = "–" if c["se"] is None else f"{c['se']:.4f}"
        t = "–" if c["t"] is None else f"{c['t']:+.1f} (±{c['t95']:.2f})"
        lines.append(f"| {c['claim']} | {c['a']} | {c['b']} | {per_seed} | {c['mean']:+.4f} ± {se} | {t} | "
                     f"{c['verdict']} |")
    return lines


__all__ = ["BALANCE_CLAIMS", "CLAIMS", "Claim", "claims_markdown", "evaluate_claims", "paired", "t95"]
