"""Balance losses, one pure function per equation (DeepSeek-V2 §2.2, DeepSeek-V3 §2.1.2).

All take the affinities ``scores_BSE`` (B sequences of S tokens, E routed experts) and the chosen experts
``indices_BSK``. Each loss is computed per sequence and averaged over the batch (DeepSeek-V2's form); to
compute it over the whole batch instead, pass tensors reshaped to (1, B*S, ...). DeepSeek-V2's D devices are our
G expert groups: group g holds experts [g*E/G, (g+1)*E/G), and its M is our ``n_limited``.

``token_mask_BS`` (optional, True for real tokens): padding counts nowhere: T in each equation is the sequence's
number of real tokens, padding neither selects experts nor adds affinity, and a sequence of padding only is left
out of the batch mean.

``group_sum`` (batch scope under expert/data parallelism): sums the selection counts and the token count over
the ranks whose batches make up the batch, so f is the global batch's, and P is this rank's share of the global
mean; the mean of the ranks' losses is then the loss of the concatenated batch, gradients included.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

GroupSum = Callable[[torch.Tensor], torch.Tensor] | None


def _frequencies(counts_BX: torch.Tensor, scores_BSE: torch.Tensor, token_mask_BS: torch.Tensor | None,
                 group_sum: GroupSum) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts / T, P_BE, real_B): selection frequencies per sequence, mean affinities P_i = (1/T) Σ_t s_{i,t}
    over real tokens, and which sequences hold any real token. Under ``group_sum``, T and the counts are the
    whole batch's, and P is this rank's score sum over the whole batch's T times the number of ranks, so the
    ranks' mean loss is exact even when they hold different numbers of real tokens."""
    B, S, _ = scores_BSE.shape
    scores_BSE = scores_BSE.float()
    if token_mask_BS is None:
        n_B = torch.full((B,), float(S), device=scores_BSE.device)
        score_sum_BE = scores_BSE.sum(dim=1)
    else:
        n_B = token_mask_BS.sum(dim=1).float()
        score_sum_BE = (scores_BSE * token_mask_BS.unsqueeze(-1)).sum(dim=1)
    real_B = n_B > 0
    if group_sum is None:
        n_B = n_B.clamp_min(1.0)
        return counts_BX / n_B[:, None], score_sum_BE / n_B[:, None], real_B
    total = group_sum(torch.cat([counts_BX.reshape(-1), n_B, n_B.new_ones(1)]))
    n_parts, total_n_B = total[-1], total[counts_BX.numel():-1].clamp_min(1.0)
    counts = total[:counts_BX.numel()].view_as(counts_BX)
    return counts / total_n_B[:, None], score_sum_BE * (n_parts / total_n_B[:, None]), real_B


def _batch_mean(loss_B: torch.Tensor, real_B: torch.Tensor) -> torch.Tensor:
    """Mean over the sequences that hold real tokens (all of them without a token mask)."""
    return (loss_B * real_B).sum() / real_B.sum().clamp_min(1)


def selection_counts(indices_BSK: torch.Tensor, n_experts: int,
                     token_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
    """(B, E): how many (real) tokens of each sequence selected each expert."""
    B = indices_BSK.shape[0]
    flat_BX = indices_BSK.reshape(B, -1)
    ones = torch.ones_like(flat_BX, dtype=torch.float32)
    if token_mask_BS is not None:
        ones = (ones.view(indices_BSK.shape) * token_mask_BS.unsqueeze(-1)).view(B, -1)
    return torch.zeros(B, n_experts, device=indices_BSK.device).scatter_add_(1, flat_BX, ones)


def expert_balance_loss(scores_BSE: torch.Tensor, indices_BSK: torch.Tensor, alpha: float, *,
                        token_mask_BS: torch.Tensor | None = None, group_sum: GroupSum = None) -> torch.Tensor:
    """Expert-level balance loss, DeepSeek-V2 eqs. (12)–(14).

    L_ExpBal = α1 Σ_i f_i P_i,  f_i = N_r/(K_r T) Σ_t 1(token t selects expert i),  P_i = (1/T) Σ_t s_{i,t}.
    """
    E, K = scores_BSE.shape[-1], indices_BSK.shape[-1]
    freq_BE, P_BE, real_B = _frequencies(selection_counts(indices_BSK, E, token_mask_BS), scores_BSE,
                                         token_mask_BS, group_sum)
    return alpha * _batch_mean((freq_BE * (E / K) * P_BE).sum(dim=1), real_B)


def device_balance_loss(scores_BSE: torch.Tensor, indices_BSK: torch.Tensor, n_groups: int, alpha: float, *,
                        token_mask_BS: torch.Tensor | None = None, group_sum: GroupSum = None) -> torch.Tensor:
    """Device-level balance loss, DeepSeek-V2 eqs. (15)–(17) (a device is an expert group).

    L_DevBal = α2 Σ_d f'_d P'_d,  f'_d = (1/|E_d|) Σ_{j∈E_d} f_j,  P'_d = Σ_{j∈E_d} P_j.
    """
    B, _, E = scores_BSE.shape
    K = indices_BSK.shape[-1]
    freq_BE, P_BE, real_B = _frequencies(selection_counts(indices_BSK, E, token_mask_BS), scores_BSE,
                                         token_mask_BS, group_sum)
    f_BGe = (freq_BE * (E / K)).view(B, n_groups, E // n_groups)
    P_BGe = P_BE.view(B, n_groups, E // n_groups)
    return alpha * _batch_mean((f_BGe.mean(dim=2) * P_BGe.sum(dim=2)).sum(dim=1), real_B)


def groups_reached(indices_BSK: torch.Tensor, n_experts: int, n_groups: int) -> torch.Tensor:
    """(B, S, G) bool: whether a token is sent to group g (at least one of its experts lives there)."""
    B, S, _ = indices_BSK.shape
    group_BSK = indices_BSK // (n_experts // n_groups)
    reached = torch.zeros(B, S, n_groups, dtype=torch.bool, device=indices_BSK.device)
    return reached.scatter_(2, group_BSK, True)


def communication_balance_loss(scores_BSE: torch.Tensor, indices_BSK: torch.Tensor, n_groups: int,
                               n_limited: int, alpha: float, *, token_mask_BS: torch.Tensor | None = None,
                               group_sum: GroupSum = None) -> torch.Tensor:
    """Communication balance loss, DeepSeek-V2 eqs. (18)–(20), with D = G devices (groups), M = ``n_limited``.

    L_CommBal = α3 Σ_d f''_d P''_d,  f''_d = D/(M T) Σ_t 1(token t is sent to device d),  P''_d = Σ_{j∈E_d} P_j.
    """
    B, _, E = scores_BSE.shape
    reached_BSG = groups_reached(indices_BSK, E, n_groups).float()
    if token_mask_BS is not None:
        reached_BSG = reached_BSG * token_mask_BS.unsqueeze(-1)
    freq_BG, P_BE, real_B = _frequencies(reached_BSG.sum(dim=1), scores_BSE, token_mask_BS, group_sum)
    f_BG = freq_BG * (n_groups / n_limited)
    P_BG = P_BE.view(B, n_groups, E // n_groups).sum(dim=2)
    return alpha * _batch_mean((f_BG * P_BG).sum(dim=1), real_B)


def sequence_balance_loss(scores_BSE: torch.Tensor, indices_BSK: torch.Tensor, alpha: float, *,
                          token_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, eqs. (17)–(20).

    L_Bal = α Σ_i f_i P_i,  f_i = N_r/(K_r T) Σ_t 1(s_{i,t} in the top-K),  P_i = (1/T) Σ_t s'_{i,t},
    s'_{i,t} = s_{i,t} / Σ_j s_{j,t} (affinities normalised per token; with softmax scores s' = s).
    """
    scores_BSE = scores_BSE.float()
    # clamp: a padding row holds zeros (and is masked out); a real token's sum is positive and unchanged.
    normalised_BSE = scores_BSE / scores_BSE.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return expert_balance_loss(normalised_BSE, indices_BSK, alpha, token_mask_BS=token_mask_BS)


def routing_entropy(scores_BSE: torch.Tensor, token_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Mean normalised entropy of the tokens' routing distributions, in [0, 1] (0-dim, in the graph).

    H̄ = (1/T) Σ_t H(p_t) / ln E,  H(p_t) = -Σ_i p_{i,t} ln p_{i,t},  p_{i,t} = s_{i,t} / Σ_j s_{j,t}
    (affinities normalised per token, as in :func:`sequence_balance_loss`; softmax scores are already p).
    1 when every token spreads evenly over all E experts, 0 when each puts all its affinity on one. T counts the
    real tokens of the whole batch.
    """
    scores_BSE = scores_BSE.float()
    E = scores_BSE.shape[-1]
    tiny = torch.finfo(torch.float32).tiny
    p_BSE = scores_BSE / scores_BSE.sum(dim=-1, keepdim=True).clamp_min(tiny)
    # 0 log 0 = 0; the clamp keeps the gradient finite where an affinity underflowed to 0 (d/dp p log p = log p + 1)
    h_BS = -(p_BSE * p_BSE.clamp_min(tiny).log()).sum(dim=-1)
    h_BS = h_BS / math.log(E) if E > 1 else torch.zeros_like(h_BS)
    if token_mask_BS is None:
        return h_BS.mean()
    mask_BS = token_mask_BS.to(h_BS.dtype)
    return (h_BS * mask_BS).sum() / mask_BS.sum().clamp_min(1.0)


def routing_entropy_loss(scores_BSE: torch.Tensor, alpha: float, *,
                         token_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
    """The routing-entropy regulariser: L_Ent = α (1 - H̄), H̄ the mean normalised routing entropy
    (:func:`routing_entropy`).

    Minimising it raises the entropy, so it *discourages* the router from collapsing onto a few experts per
    token before the experts have specialised (a premature, confident routing that the balance losses, which
    look at loads and not at per-token spread, do not see). It is 0 at uniform affinities and α at one-hot ones;
    the normalisation by ln E makes α mean the same at any expert count. Its gradient is that of -α H̄.
    """
    return alpha * (1.0 - routing_entropy(scores_BSE, token_mask_BS))
