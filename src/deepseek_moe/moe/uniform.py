"""The uniform-routing warm-up draw: K distinct experts per token, uniformly over the K-subsets the router may
choose, that is, all of them, or under a group limit those that touch at most M of the G expert groups.

Without a group limit that is the top-K of E uniform noises. With one, the top-K of noise after keeping each
token's M best groups by noise is not uniform over the allowed subsets (conditioning on how the groups were
ranked skews which experts inside them win), so the limited draw is exact instead:

1. j, the number of groups the token's subset touches, with P(j) ∝ C(G, j) N_j, where N_j counts the K-subsets
   of j given groups' experts that touch all j of them (inclusion–exclusion over the groups left out);
2. j groups uniformly, then K of their experts uniformly, both redrawn (j kept) until all j groups are touched.

A subset touching j groups then has probability P(j) / (C(G, j) N_j) = 1 / (number of allowed subsets).
"""

from __future__ import annotations

from math import comb

import torch


def subsets_touching_all(n_touched: int, per_group: int, n_activated: int) -> int:
    """K-subsets of the experts of ``n_touched`` given groups (``per_group`` each) that touch every one of them."""
    return sum((-1) ** i * comb(n_touched, i) * comb((n_touched - i) * per_group, n_activated)
               for i in range(n_touched + 1))


def uniform_choice(n_tokens: int, n_experts: int, n_activated: int, n_groups: int, n_limited: int,
                   generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(T, K) int64: each token's K distinct experts, uniformly over the allowed K-subsets (see the module)."""
    E, K, G, M = n_experts, n_activated, n_groups, n_limited
    if M >= min(G, K):  # K experts touch at most K groups: the limit cannot bind
        return torch.rand(n_tokens, E, generator=generator, device=device).topk(K, dim=-1).indices
    per_group = E // G
    weights_J = torch.tensor([comb(G, j) * subsets_touching_all(j, per_group, K) for j in range(1, M + 1)],
                             dtype=torch.float64, device=device)
    touched_T = torch.multinomial(weights_J, n_tokens, replacement=True, generator=generator) + 1
    indices_TK = torch.empty(n_tokens, K, dtype=torch.int64, device=device)
    pending_P = torch.arange(n_tokens, device=device)  # P: tokens still without an accepted draw
    while pending_P.numel() > 0:
        P, j_P = pending_P.numel(), touched_T[pending_P]
        group_rank_PG = torch.rand(P, G, generator=generator, device=device).argsort(dim=1).argsort(dim=1)
        allowed_PE = (group_rank_PG < j_P[:, None]).repeat_interleave(per_group, dim=1)  # j random groups
        noise_PE = torch.rand(P, E, generator=generator, device=device).masked_fill(~allowed_PE, -1.0)
        chosen_PK = noise_PE.topk(K, dim=-1).indices  # j * per_group >= K whenever P(j) > 0
        hit_PG = torch.zeros(P, G, dtype=torch.bool, device=device).scatter_(1, chosen_PK // per_group, True)
        accepted_P = hit_PG.sum(dim=1) == j_P
        indices_TK[pending_P[accepted_P]] = chosen_PK[accepted_P]
        pending_P = pending_P[~accepted_P]
    return indices_TK


__all__ = ["subsets_touching_all", "uniform_choice"]
