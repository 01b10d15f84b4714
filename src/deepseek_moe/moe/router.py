"""The gate: token-to-expert affinities, group-limited top-K selection (DeepSeek-V2's device-limited routing,
an expert group being a device), and gate values.

DeepSeekMoE / DeepSeek-V2: s_{i,t} = Softmax_i(u_t^T e_i); keep the M groups with the highest affinity, take the
top-K experts inside them; gates g = s for the chosen experts (times ``route_scale``).
DeepSeek-V3: s = sigmoid(u_t^T e_i); choose with s + b (a per-expert bias, never in the gates), rank groups by
the sum of their two largest s + b; gates are s over the chosen K, normalised, times ``route_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.config import MoEConfig
from deepseek_moe.moe.uniform import uniform_choice


@dataclass
class Routing:
    """The gate's decision for T tokens.

    indices_TK: chosen routed experts (int64). weights_TK: gate values g (fp32). scores_TE: affinities s (fp32,
    in the autograd graph; None under uniform routing, where no affinity exists and the losses are off).
    """

    indices_TK: torch.Tensor
    weights_TK: torch.Tensor
    scores_TE: torch.Tensor | None

    @property
    def affinity_TK(self) -> torch.Tensor:
        """s of each chosen expert: what token dropping ranks assignments by (uniform routing: the gates)."""
        if self.scores_TE is None:
            return self.weights_TK.detach()
        return self.scores_TE.detach().gather(1, self.indices_TK)


def limit_to_groups(choice_TE: torch.Tensor, n_groups: int, n_limited: int, group_score_func: str) -> torch.Tensor:
    """Mask (with -inf) the experts outside each token's ``n_limited`` best groups.

    A group's score is its highest choice score ("max", DeepSeek-V2) or the sum of its two highest
    ("top2_sum", DeepSeek-V3). Experts are placed contiguously: group g holds experts [g*E/G, (g+1)*E/G).
    """
    T, E = choice_TE.shape
    grouped_TGe = choice_TE.view(T, n_groups, E // n_groups)
    if group_score_func == "max":
        group_scores_TG = grouped_TGe.amax(dim=-1)
    else:
        group_scores_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
    kept_TM = group_scores_TG.topk(n_limited, dim=-1).indices
    group_mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, kept_TM, True)
    return grouped_TGe.masked_fill(~group_mask_TG.unsqueeze(-1), float("-inf")).view(T, E)


class Router(nn.Module):
    """Parameters: ``weight`` (E, D), the expert centroids e_i; buffer ``e_score_correction_bias`` (E,) when
    ``use_routing_bias`` (moved by :func:`deepseek_moe.moe.bias.update_routing_bias`, never by gradients).

    The affinities are computed in fp32 whatever the activation dtype, autocast included: under bf16 the logits
    would flip top-K choices between near-equal experts."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.e_score_correction_bias: torch.Tensor | None
        if cfg.use_routing_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.cfg.init_std)
        if self.e_score_correction_bias is not None:
            nn.init.zeros_(self.e_score_correction_bias)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.cfg
        # autocast off: F.linear is on its cast list, so it would run in bf16 despite the .float() calls.
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.softmax(dim=-1) if cfg.score_func == "softmax" else logits_TE.sigmoid()
        choice_TE = scores_TE.detach()
        if self.e_score_correction_bias is not None:
            choice_TE = choice_TE + self.e_score_correction_bias
        indices_TK = self._select(choice_TE)
        weights_TK = scores_TE.gather(1, indices_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(indices_TK, weights_TK * cfg.route_scale, scores_TE)

    def uniform(self, n_tokens: int, generator: torch.Generator, device: torch.device) -> Routing:
        """Uniform-routing warm-up: K distinct experts per token, uniformly over the K-subsets the router may
        choose (those inside at most M groups when routing is group-limited, so the traffic bound holds from the
        first step; see :mod:`deepseek_moe.moe.uniform`); gates 1/K."""
        cfg = self.cfg
        indices_TK = uniform_choice(n_tokens, cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_expert_groups,
                                    cfg.n_limited_groups, generator, device)
        weights_TK = torch.full(indices_TK.shape, 1.0 / cfg.n_activated_experts, device=device)
        return Routing(indices_TK, weights_TK, None)

    def _select(self, choice_TE: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.group_limited:  # with M == G the mask would keep every expert
            choice_TE = limit_to_groups(choice_TE, cfg.n_expert_groups, cfg.n_limited_groups, cfg.group_score_func)
        return choice_TE.topk(cfg.n_activated_experts, dim=-1).indices
