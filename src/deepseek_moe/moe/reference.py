"""A slow, obviously-correct DeepSeekMoE forward: one token, one expert at a time, in plain Python.

It shares no routing, dropping or dispatch code with the fast layer, only its parameters, and exists to test the
fast path against. Learned routing only (uniform routing draws random numbers and is tested on its own).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from deepseek_moe.moe.layer import MoE
from deepseek_moe.moe.router import limit_to_groups  # margin check only; routing above is independent


def _swiglu(u: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    u, w1, w2, w3 = u.double(), w1.double(), w2.double(), w3.double()
    return w2 @ (F.silu(w1 @ u) * (w3 @ u))


def reference_forward(moe: MoE, x: torch.Tensor, *, token_mask: torch.Tensor | None = None,
                      protected_sequences: list[int] | None = None, drop: bool = False) -> torch.Tensor:
    """The layer's output for ``x`` ((B, S, D) or (S, D)), computed token by token in float64 (cast back to
    ``x.dtype`` at the end), so that it is the more exact side of any comparison.

    ``token_mask`` (shaped like x's tokens, True for real tokens): padding is skipped entirely (output zero,
    not in the budget). ``drop`` applies token dropping (the fast layer drops when training or
    ``drop_at_inference``), with the sequences listed in ``protected_sequences`` never dropped.
    """
    cfg = moe.cfg
    x_BSD = x if x.dim() == 3 else x.unsqueeze(0)
    B, S, _ = x_BSD.shape
    real = [[True] * S for _ in range(B)] if token_mask is None else token_mask.reshape(B, S).tolist()
    E, K, G, M = cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_expert_groups, cfg.n_limited_groups
    per_group = E // G
    W = moe.gate.weight.double()
    bias = moe.gate.e_score_correction_bias

    # 1. Route every token: a list of assignments (sequence, position, expert, gate, affinity).
    assignments: list[tuple[int, int, int, torch.Tensor, float]] = []
    for b in range(B):
        for s in [s for s in range(S) if real[b][s]]:
            u = x_BSD[b, s].double()
            logits = torch.stack([u @ W[i] for i in range(E)])
            scores = torch.softmax(logits, dim=0) if cfg.score_func == "softmax" else torch.sigmoid(logits)
            choice = [float(scores[i].detach()) + (float(bias[i]) if bias is not None else 0.0) for i in range(E)]
            allowed = list(range(E))
            if M < G:
                group_scores = []
                for group in range(G):
                    members = sorted(choice[group * per_group:(group + 1) * per_group], reverse=True)
                    group_scores.append(members[0] if cfg.group_score_func == "max" else members[0] + members[1])
                kept = sorted(range(G), key=lambda group: -group_scores[group])[:M]
                allowed = [i for i in range(E) if i // per_group in kept]
            chosen = sorted(allowed, key=lambda i: -choice[i])[:K]
            gates = [scores[i] for i in chosen]
            if cfg.norm_topk_prob:
                total = sum(gates)
                gates = [g / (total + 1e-20) for g in gates]
            for i, gate in zip(chosen, gates, strict=True):
                assignments.append((b, s, i, gate * cfg.route_scale, float(scores[i].detach())))

    # 2. Token dropping: each group keeps its protected assignments, then the highest-affinity ones, up to
    #    ceil(capacity * K * T / G) in all, T counting real tokens only.
    if drop and cfg.capacity_factor is not None:
        budget = math.ceil(cfg.capacity_factor * K * sum(map(sum, real)) / G)
        protected = set(protected_sequences or [])
        kept_assignments = []
        for g in range(G):
            in_group = [a for a in assignments if a[2] // per_group == g]
            ranked = sorted(in_group, key=lambda a: (a[0] not in protected, -a[4]))
            kept_assignments += [a for rank, a in enumerate(ranked) if rank < budget or a[0] in protected]
        assignments = kept_assignments

    # 3. Each token's output: its shared experts (K_s of them, each of width F) plus its gated routed experts.
    contributions: dict[tuple[int, int], list[torch.Tensor]] = {(b, s): [] for b in range(B) for s in range(S)}
    ex = moe.experts
    for b, s, i, gate, _ in assignments:
        contributions[(b, s)].append(gate * _swiglu(x_BSD[b, s], ex.w1[i], ex.w2[i], ex.w3[i]))
    if moe.shared_experts is not None:
        sh, width = moe.shared_experts, cfg.moe_inter_dim
        for b in range(B):
            for s in [s for s in range(S) if real[b][s]]:
                for k in range(cfg.n_shared_experts):
                    rows = slice(k * width, (k + 1) * width)
                    contributions[(b, s)].append(_swiglu(x_BSD[b, s], sh.w1.weight[rows], sh.w2.weight[:, rows],
                                                         sh.w3.weight[rows]))
    out = torch.stack([torch.stack(contributions[(b, s)]).sum(0) if contributions[(b, s)]
                       else torch.zeros_like(x_BSD[b, s], dtype=torch.float64) for b in range(B) for s in range(S)])
    return out.to(x.dtype).view(x.shape)


def top_k_margin(moe: MoE, x: torch.Tensor) -> float:
    """Smallest gap, over tokens, between the K-th and (K+1)-th choice score and between the M-th and (M+1)-th
    group score: below ~1e-4, rounding may flip a choice, and a test comparing two implementations means little."""
    cfg = moe.cfg
    x_TD = x.detach().reshape(-1, cfg.dim).float()
    logits = x_TD @ moe.gate.weight.detach().float().t()
    scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    if moe.gate.e_score_correction_bias is not None:
        scores = scores + moe.gate.e_score_correction_bias
    margins = []
    if cfg.group_limited:
        grouped = scores.view(scores.shape[0], cfg.n_expert_groups, -1)
        gs = grouped.amax(-1) if cfg.group_score_func == "max" else grouped.topk(2, -1).values.sum(-1)
        top = gs.topk(cfg.n_limited_groups + 1, dim=-1).values
        margins.append((top[:, -2] - top[:, -1]).min())
        scores = limit_to_groups(scores, cfg.n_expert_groups, cfg.n_limited_groups, cfg.group_score_func)
    if cfg.n_activated_experts < cfg.n_routed_experts:
        top = scores.topk(cfg.n_activated_experts + 1, dim=-1).values
        margins.append((top[:, -2] - top[:, -1]).min())  # inf when only K experts were allowed
    return float(torch.stack(margins).min()) if margins else math.inf
