"""The uniform-routing warm-up draw is uniform over the K-subsets the router may choose (DeepSeek-V2's
device-limited routing: those touching at most M groups), checked against enumerations of those subsets."""

import itertools

import torch

from deepseek_moe import MoE, MoEConfig


def _allowed_subsets(E: int, G: int, M: int, K: int) -> list[tuple[int, ...]]:
    per_group = E // G
    return [c for c in itertools.combinations(range(E), K) if len({i // per_group for i in c}) <= M]


def _draw(E: int, G: int, M: int, K: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    moe = MoE(MoEConfig(dim=8, moe_inter_dim=4, n_routed_experts=E, n_activated_experts=K, n_expert_groups=G,
                        n_limited_groups=M))
    gen = torch.Generator().manual_seed(seed)
    return moe.gate.uniform(n_tokens, gen, torch.device("cpu")).indices_TK


def test_every_allowed_subset_is_equally_likely():
    # E=12 in G=4 groups of 3, M=2, K=3: 4 subsets inside one group, 108 across two; 112 cells.
    E, G, M, K = 12, 4, 2, 3
    cells = {c: i for i, c in enumerate(_allowed_subsets(E, G, M, K))}
    n = 112 * 300
    drawn = _draw(E, G, M, K, n).sort(dim=1).values.tolist()
    counts = torch.zeros(len(cells))
    for row in drawn:
        counts[cells[tuple(row)]] += 1  # a KeyError would be a subset breaking the group limit
    expected = n / len(cells)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 111 degrees of freedom: mean 111, sd 14.9; 200 is ~6 sd (p < 1e-8) for a truly uniform draw.
    assert chi2 < 200, chi2
    # The subsets inside one group are where group-limited top-K on noise goes wrong: check them on their own.
    one_group = sum(float(counts[i]) for c, i in cells.items() if len({e // 3 for e in c}) == 1)
    assert abs(one_group / n - 4 / 112) < 5 * (4 / 112 / n) ** 0.5


def test_expert_load_and_pair_frequencies_match_the_enumeration():
    # The tiny preset's shape: E=16, G=4, M=2, K=4. Frequencies of each expert and of same-group and
    # cross-group pairs against their exact values over the 412 allowed subsets; tolerance 5 sd.
    E, G, M, K = 16, 4, 2, 4
    allowed = _allowed_subsets(E, G, M, K)
    same = sum(1 for c in allowed if 0 in c and 1 in c) / len(allowed)  # experts 0, 1 share group 0
    cross = sum(1 for c in allowed if 0 in c and 4 in c) / len(allowed)  # group 0 and group 1
    n = 40_000
    drawn = _draw(E, G, M, K, n, seed=1)
    hit_TE = torch.zeros(n, E).scatter_(1, drawn, 1.0)
    load = hit_TE.mean(dim=0)
    sd = (K / E * (1 - K / E) / n) ** 0.5
    assert (load - K / E).abs().max() < 5 * sd, load
    pairs = hit_TE.T @ hit_TE / n  # (E, E) co-selection frequencies
    group = torch.arange(E) // (E // G)
    off_diagonal = ~torch.eye(E, dtype=torch.bool)
    same_mean = float(pairs[(group[:, None] == group[None, :]) & off_diagonal].mean())
    cross_mean = float(pairs[group[:, None] != group[None, :]].mean())
    # Means over 48 and 192 pairs: their sd is below that of one pair, sqrt(p (1 - p) / n).
    assert abs(same_mean - same) < 5 * (same * (1 - same) / n) ** 0.5, (same_mean, same)
    assert abs(cross_mean - cross) < 5 * (cross * (1 - cross) / n) ** 0.5, (cross_mean, cross)


def test_without_a_binding_limit_it_is_plain_top_k_of_noise():
    # M >= K: every K-subset is allowed; the draw is the top-K of E uniform noises (the stream is unchanged).
    gen = torch.Generator().manual_seed(3)
    noise = torch.rand(50, 8, generator=gen)
    torch.testing.assert_close(_draw(8, 4, 2, 2, 50, seed=3), noise.topk(2, dim=-1).indices)
