"""Speculative decoding (infer/draft.py, infer/speculative.py): n-gram drafts; greedy output identical to plain
greedy (one prompt and batched, with rejections that roll the latent cache back); sampled output distributed as
the target model's own next-token distribution, checked by chi-square over many seeded draws, including with a
draft far from the target (which an "always accept" or "greedy draft" shortcut fails)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import pytest
import torch
from test_model_configs import small_config

from deepseek_moe.infer.draft import Draft, NgramDrafter
from deepseek_moe.infer.generate import generate
from deepseek_moe.infer.sampling import probabilities
from deepseek_moe.infer.speculative import accept
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

PROMPTS = [[5, 9, 2, 5, 9, 2, 5, 9], [7, 1, 3, 3, 8, 11, 4], [30]]


@pytest.fixture(scope="module")
def model() -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)
    return DeepSeekMoEForCausalLM(small_config(max_seq_len=96)).double()


def chi2_critical(dof: int, z: float = 3.719) -> float:
    """Upper quantile of chi-square(dof) by Wilson-Hilferty; z = 3.719 is the normal's 1 - 1e-4 quantile."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(counts: Counter[int], p: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic of ``counts`` (n draws) against probabilities ``p`` (V,), cells with expected count
    under 5 pooled into one; returns (statistic, degrees of freedom). A draw outside p's support counts fully."""
    expected = (p * n).tolist()
    big = [t for t, e in enumerate(expected) if e >= 5.0]
    small = [t for t, e in enumerate(expected) if e < 5.0]
    stat = sum((counts.get(t, 0) - expected[t]) ** 2 / expected[t] for t in big)
    pooled_e = sum(expected[t] for t in small)
    pooled_o = sum(counts.get(t, 0) for t in small)
    cells = len(big)
    if pooled_e > 0:
        stat += (pooled_o - pooled_e) ** 2 / pooled_e
        cells += 1
    elif pooled_o > 0:
        return math.inf, max(cells - 1, 1)
    return stat, max(cells - 1, 1)


# --- the n-gram drafter --------------------------------------------------------------------------------------

def test_ngram_drafter_proposes_what_followed_the_latest_match() -> None:
    d = NgramDrafter(max_n=3, min_n=1)
    # The last 3 tokens (1, 2, 3) occurred at 0 and 5; the latest earlier occurrence (5) is followed by 9, 1.
    assert d.propose([1, 2, 3, 7, 7, 1, 2, 3, 9, 1, 2, 3], 4).tokens == [9, 1, 2, 3]
    assert d.propose([1, 2, 3, 7, 7, 1, 2, 3, 9, 1, 2, 3], 2).tokens == [9, 1]
    # No 3- or 2-gram match: the 1-gram (4) is found at 1, followed by 5 and 6.
    assert d.propose([3, 4, 5, 6, 4], 3).tokens == [5, 6, 4]
    assert d.propose([1, 2, 3], 3).tokens == []  # nothing repeats
    assert NgramDrafter(max_n=2, min_n=2).propose([3, 4, 5, 6, 4], 3).tokens == []
    assert d.propose([8], 3).tokens == [] and d.propose([8, 8], 0).tokens == []
    with pytest.raises(ValueError, match="max_n"):
        NgramDrafter(max_n=1, min_n=2)


# --- greedy: identical to plain decoding ---------------------------------------------------------------------

@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_speculative_equals_greedy(model: DeepSeekMoEForCausalLM, attn_impl: str, k: int) -> None:
    for layer in model.layers:
        layer.attn.attn_impl = attn_impl
    plain = generate(model, PROMPTS, max_new_tokens=40)
    spec = generate(model, PROMPTS, max_new_tokens=40, drafter=NgramDrafter(), num_draft_tokens=k)
    assert spec.new_tokens == plain.new_tokens
    stats = spec.speculative
    assert stats is not None
    # The run must have exercised both branches: accepted drafts and rejected ones (rolled back).
    assert 0 < stats.accepted < stats.drafted
    for prompt, expected in zip(PROMPTS, plain.new_tokens, strict=True):
        assert generate(model, [prompt], max_new_tokens=40, drafter=NgramDrafter(),
                        num_draft_tokens=k).new_tokens[0] == expected


def test_greedy_speculative_stops_and_limits_as_plain(model: DeepSeekMoEForCausalLM) -> None:
    plain = generate(model, PROMPTS, max_new_tokens=30)
    stop = plain.new_tokens[1][12]  # inside the repeating part, where a whole accepted draft may pass it
    stopped = generate(model, PROMPTS, max_new_tokens=30, stop_tokens=[stop])
    streamed: list[tuple[int, int]] = []
    spec = generate(model, PROMPTS, max_new_tokens=30, stop_tokens=[stop], drafter=NgramDrafter(),
                    num_draft_tokens=4, stream=lambda r, t: streamed.append((r, t)))
    assert spec.new_tokens == stopped.new_tokens
    assert [[t for r, t in streamed if r == row] for row in range(3)] == spec.new_tokens
    # max_seq_len (96) is a row's room: the draft never runs past it.
    long = [list(range(1, 60)) * 1 + [1, 2, 3]]
    assert generate(model, long, max_new_tokens=80, drafter=NgramDrafter()).new_tokens == \
        generate(model, long, max_new_tokens=80).new_tokens


def test_discarded_draft_leaves_the_cache_as_if_never_fed(model: DeepSeekMoEForCausalLM) -> None:
    prompt = torch.tensor([[4, 8, 15, 16, 23, 42]])
    cache = model.new_cache()
    model(prompt, cache=cache)
    model(torch.tensor([[7, 1, 2]]), cache=cache)  # one kept token and a draft of two, then rejected
    cache.discard(torch.tensor([[False, True, True]]))
    got = model(torch.tensor([[9]]), cache=cache).logits[0, -1]
    want = model(torch.tensor([[4, 8, 15, 16, 23, 42, 7, 9]])).logits[0, -1]
    torch.testing.assert_close(got, want)
    assert cache.mask is not None and cache.mask.shape == (1, 8) and cache.layers[0].length == 8


# --- sampling: the target distribution exactly ---------------------------------------------------------------

class FixedDrafter:
    """Always proposes the same tokens (deterministic: q is a point mass)."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    def propose(self, context: Sequence[int], k: int) -> Draft:
        return Draft(self.tokens[:k])


class SampledDrafter:
    """Draws each drafted token from a fixed distribution q (its own generator), and says so."""

    def __init__(self, q: torch.Tensor, seed: int) -> None:
        self.q = q
        self.generator = torch.Generator().manual_seed(seed)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        tokens = torch.multinomial(self.q, k, replacement=True, generator=self.generator).tolist()
        return Draft(tokens, self.q.expand(k, -1))


def far_distribution(p: torch.Tensor) -> torch.Tensor:
    """A distribution concentrated where p is small: the draft a shortcut would follow."""
    q = (1.0 - p / p.max()) ** 8 + 1e-3
    return q / q.sum()


@pytest.mark.parametrize("case", ["argmax", "unlikely", "sampled_far"])
def test_accepted_tokens_follow_the_target_at_temperature_1(model: DeepSeekMoEForCausalLM, case: str) -> None:
    """The first token emitted after verifying a draft is distributed as p(. | prefix), whatever the draft."""
    prefix = torch.tensor([[3, 14, 15, 9, 2, 6]])
    with torch.no_grad():
        logits = model(prefix).logits[0, -1:].float()  # (1, V)
    p = probabilities(logits, temperature=1.0)[0]
    # Verification logits for a draft of 2: the first row is the prefix's; the rest never matter to the first
    # token's distribution, so they are arbitrary.
    verify = torch.cat([logits, torch.randn(2, logits.shape[1], generator=torch.Generator().manual_seed(1))])
    q = far_distribution(p)
    gen = torch.Generator().manual_seed(1234)
    drafter = SampledDrafter(q, seed=99)
    n = 6000
    counts: Counter[int] = Counter()
    for _ in range(n):
        if case == "argmax":
            draft = Draft([int(p.argmax()), 5])
        elif case == "unlikely":
            draft = Draft([int(p.argmin()), 5])
        else:
            draft = drafter.propose([], 2)
        counts[accept(verify, draft, temperature=1.0, generator=gen)[0]] += 1
    stat, dof = chi2(counts, p, n)
    assert stat < chi2_critical(dof), (stat, dof)
    # The check has power: the draft's own distribution (what "always accept" would emit) is far from p.
    shortcut = Counter(torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(5)).tolist())
    assert chi2(shortcut, p, n)[0] > 10 * chi2_critical(dof)


@torch.no_grad()
def assert_pairs_follow(model: DeepSeekMoEForCausalLM, prompt: list[int], drafter: object,
                        exact: dict[tuple[int, int], float], sampling: dict[str, object], n: int = 500) -> None:
    """The first two tokens of ``n`` speculative generations (seeds 0..n-1, 2 drafted tokens) never leave the
    target's support and pass a chi-square test against ``exact``, the target's pair distribution."""
    cells = sorted(exact)
    counts: Counter[tuple[int, int]] = Counter()
    for i in range(n):
        out = generate(model, [prompt], max_new_tokens=2, drafter=drafter, num_draft_tokens=2, seed=i,
                       **sampling)  # type: ignore[arg-type]
        counts[(out.new_tokens[0][0], out.new_tokens[0][1])] += 1
    assert set(counts) <= set(exact), set(counts) - set(exact)
    p = torch.tensor([exact[c] for c in cells])
    stat, dof = chi2(Counter({j: counts[c] for j, c in enumerate(cells)}), p, n)
    assert stat < chi2_critical(dof), (stat, dof, counts)


def _pair_distribution(model: DeepSeekMoEForCausalLM, prompt: list[int], **sampling: object) -> dict[tuple[int, int], float]:
    """The exact distribution of the first two new tokens under the model's own sampling transform."""
    p1 = probabilities(model(torch.tensor([prompt])).logits[0, -1].float(), **sampling)  # type: ignore[arg-type]
    out = {}
    for a in p1.nonzero().flatten().tolist():
        p2 = probabilities(model(torch.tensor([prompt + [a]])).logits[0, -1].float(), **sampling)  # type: ignore[arg-type]
        for b in p2.nonzero().flatten().tolist():
            out[(a, b)] = float(p1[a] * p2[b])
    return out


@pytest.mark.parametrize("drafter_kind", ["fixed", "sampled_far"])
def test_generate_speculative_sampling_matches_target_pairs(model: DeepSeekMoEForCausalLM,
                                                            drafter_kind: str) -> None:
    """End to end through generate, with temperature and top-k/top-p applied to p before acceptance: the joint
    distribution of the first two new tokens (the second comes out of a verification) is the target's."""
    prompt = [3, 14, 15, 9, 2, 6]
    sampling = dict(temperature=0.7, top_k=3, top_p=0.95)
    exact = _pair_distribution(model, prompt, **sampling)
    cells = sorted(exact)
    V = model.config.vocab_size
    if drafter_kind == "fixed":
        # Drafts the least likely of the pairs' second tokens: mostly rejected, sometimes accepted.
        drafter: FixedDrafter | SampledDrafter = FixedDrafter([min(cells, key=lambda c: exact[c])[1], 7, 7])
    else:
        q = torch.full((V,), 0.1 / V)
        q[[b for _, b in cells]] += 0.9 / len(cells)  # support overlapping the target's, weights far from it
        drafter = SampledDrafter(q / q.sum(), seed=7)
    assert_pairs_follow(model, prompt, drafter, exact, sampling)


def test_accept_rejects_a_draft_and_logits_that_disagree() -> None:
    with pytest.raises(ValueError, match="expected \\(3, vocab\\)"):
        accept(torch.zeros(2, 5), Draft([1, 2]), temperature=0.0)
    with pytest.raises(ValueError, match="draft q"):
        Draft([1, 2], torch.ones(3, 5))
