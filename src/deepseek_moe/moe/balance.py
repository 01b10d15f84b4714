"""Balance losses, one pure function per equation (DeepSeek-V2 §2.2, DeepSeek-V3 §2.1.2).

All take the affinities ``scores_BSE`` (B sequences of S tokens, E routed experts) and the chosen experts
``indices_BSK``. Each loss is computed per sequence and averaged over the batch (DeepSeek-V2's form); to
compute it over the whole batch instead, pass tensors reshaped to (1, B*S, ...). Devices are expert groups:
device d holds experts [d*E/D, (d+1)*E/D).

``group_sum`` (batch scope under expert/data parallelism): sums the selection counts and the token count over
the ranks whose batches make up the batch, so f is the global batch's while P stays this rank's share; the
mean of the ranks' losses is then the loss of the concatenated batch, gradients included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GroupSum = Callable[[torch.Tensor], torch.Tensor] | None


def _fractions(counts_BX: torch.Tensor, n_tokens: int, group_sum: GroupSum) -> torch.Tensor:
    """counts / tokens, both summed over the group first when ``group_sum`` is given."""
    if group_sum is None:
        return counts_BX / n_tokens
    total = group_sum(torch.cat([counts_BX.reshape(-1), counts_BX.new_tensor([n_tokens])]))
    return total[:-1].view_as(counts_BX) / total[-1]


def selection_counts(indices_BSK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(B, E): how many tokens of each sequence selected each expert."""
    B = indices_BSK.shape[0]
    flat_BX = indices_BSK.reshape(B, -1)
    ones = torch.ones_like(flat_BX, dtype=torch.float32)
    return torch.zeros(B, n_experts, device=indices_BSK.device).scatter_add_(1, flat_BX, ones)


def expert_balance_loss(scores_BSE: torch.Tensor, indices_BSK: torch.Tensor, alpha: float, *,
                        group_sum: GroupSum = None) -> torch.Tensor:
    """Expert-level balance loss, DeepSeek-V2 eqs. (12)–(14).

    L_ExpBal = α1 Σ_i f_i P_i,  f_i = N_r/(K_r T) Σ_t 1(token t selects expert i),  P_i = (1/T) Σ_t s_{i,t}.
    """
    _, S, E = scores_BSE.shape
    K = indices_BSK.shape[-1]
    f_BE = _fractions(selection_counts(indices_BSK, E), S, group_sum) * (E / K)
    P_BE = scores_BSE.float().mean(dim=1)
    return alpha * (f_BE * P_BE).sum(dim=1).mean()


def device_balance_loss(scores_BSE: torch.Tensor, indices_BSK: torch.Tensor, n_devices: int,
                        alpha: float, *, group_sum: GroupSum = None) -> torch.Tensor:
    """Device-level balance loss, DeepSeek-V2 eqs. (15)–(17).

    L_DevBal = α2 Σ_d f'_d P'_d,  f'_d = (1/|E_d|) Σ_{j∈E_d} f_j,  P'_d = Σ_{j∈E_d} P_j.
    """
    B, S, E = scores_BSE.shape
    K = indices_BSK.shape[-1]
    f_BDe = (_fractions(selection_counts(indices_BSK, E), S, group_sum) * (E / K)).view(B, n_devices, E // n_devices)
    P_BDe = scores_BSE.float().mean(dim=1).view(B, n_devices, E // n_devices)
    return alpha * (f_BDe.mean(dim=2) * P_BDe.sum(dim=2)).sum(dim=1).mean()


def devices_reached(indices_BSK: torch.Tensor, n_experts: int, n_devices: int) -> torch.Tensor:
    """(B, S, D) bool: whether a token is sent to device d (at least one of its experts lives there)."""
    B, S, _ = indices_BSK.shape
    device_BSK = indices_BSK // (n_experts // n_devices)
    reached = torch.zeros(B, S, n_devices, dtype=torch.bool, device=indices_BSK.device)
    return reached.scatter_(2, device_BSK, True)


def communication_balance_loss(scores_BSE: torch.Tensor, indices_BSK: torch.Tensor, n_devices: int,
                               n_limited: int, alpha: float, *, group_sum: GroupSum = None) -> torch.Tensor:
    """Communication balance loss, DeepSeek-V2 eqs. (18)–(20).

    L_CommBal = α3 Σ_d f''_d P''_d,  f''_d = D/(M T) Σ_t 1(token t is sent to device d),  P''_d = Σ_{j∈E_d} P_j.
    """
    B, S, E = scores_BSE.shape
    reached_BD = devices_reached(indices_BSK, E, n_devices).float().sum(dim=1)
    f_BD = _fractions(reached_BD, S, group_sum) * (n_devices / n_limited)
    P_BD = scores_BSE.float().mean(dim=1).view(B, n_devices, E // n_devices).sum(dim=2)
    return alpha * (f_BD * P_BD).sum(dim=1).mean()


def sequence_balance_loss(scores_BSE: torch.Tensor, indices_BSK: torch.Tensor, alpha: float) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, eqs. (17)–(20).

    L_Bal = α Σ_i f_i P_i,  f_i = N_r/(K_r T) Σ_t 1(s_{i,t} in the top-K),  P_i = (1/T) Σ_t s'_{i,t},
    s'_{i,t} = s_{i,t} / Σ_j s_{j,t} (affinities normalised per token; with softmax scores s' = s).
    """
    normalised_BSE = scores_BSE.float() / scores_BSE.float().sum(dim=-1, keepdim=True)
    return expert_balance_loss(normalised_BSE, indices_BSK, alpha)
