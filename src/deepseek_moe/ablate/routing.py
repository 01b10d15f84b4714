"""Evaluation-time routing changes for the paper's §4.5 analyses, applied to a trained model and undone after.

* Redundancy: per token, mask out its ``skip_top`` highest-affinity routed experts and route to the next K
  (``skip_top=0`` is the trained routing). If experts are specialised and not redundant, losing the top ones hurts.
* Shared expert: disable the shared experts and activate ``extra`` more routed experts per token.

The trained :class:`~deepseek_moe.moe.router.Router` is wrapped, not changed: training never sees this code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from deepseek_moe.moe.all_layers import moe_layers
from deepseek_moe.moe.router import Router, Routing


class AlteredRouter(nn.Module):
    """A trained router whose choice skips each token's ``skip_top`` best experts and takes ``n_activated``.

    Affinities and gate values are computed as the router computes them (softmax or sigmoid scores, the routing
    bias for choosing only, ``norm_topk_prob``, ``route_scale``). Group-limited routers are refused: which groups
    a token keeps after masking its best experts is a question the paper's analysis does not answer.
    """

    def __init__(self, router: Router, *, skip_top: int = 0, n_activated: int | None = None) -> None:
        super().__init__()
        cfg = router.cfg
        k = cfg.n_activated_experts if n_activated is None else n_activated
        if cfg.group_limited:
            raise ValueError(f"altered routing needs a router without a group limit, got n_limited_groups "
                             f"({cfg.n_limited_groups}) < n_expert_groups ({cfg.n_expert_groups})")
        if skip_top < 0 or k < 1 or skip_top + k > cfg.n_routed_experts:
            raise ValueError(f"skip_top ({skip_top}) + n_activated ({k}) must be <= n_routed_experts "
                             f"({cfg.n_routed_experts}), with skip_top >= 0 and n_activated >= 1")
        self.router, self.skip_top, self.n_activated = router, skip_top, k

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.router.cfg
        scores_TE = self.router(x_TD).scores_TE
        assert scores_TE is not None  # a learned router always returns its affinities
        choice_TE = scores_TE.detach()
        bias = self.router.e_score_correction_bias
        if bias is not None:
            choice_TE = choice_TE + bias
        if self.skip_top:
            best_TS = choice_TE.topk(self.skip_top, dim=-1).indices
            choice_TE = choice_TE.scatter(1, best_TS, float("-inf"))
        indices_TK = choice_TE.topk(self.n_activated, dim=-1).indices
        weights_TK = scores_TE.gather(1, indices_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(indices_TK, weights_TK * cfg.route_scale, scores_TE)


@contextlib.contextmanager
def altered_routing(model: nn.Module, *, skip_top: int = 0, extra: int = 0,
                    drop_shared: bool = False) -> Iterator[None]:
    """Within the block, every MoE layer of ``model`` skips its tokens' ``skip_top`` best experts, activates ``extra`` more routed experts, and (``drop_shared``) runs without its shared
    experts. The trained modules are put back on exit."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("altered_routing: the model has no MoE layer")
    if drop_shared and any(moe.shared_experts is None for _, moe in layers):
        raise ValueError("altered_routing: drop_shared=True but a MoE layer has no shared experts")
    saved = [(moe, moe.gate, moe.shared_experts) for _, moe in layers]
    try:
        for _, moe in layers:
            moe.gate = AlteredRouter(moe.gate, skip_top=skip_top,  # type: ignore[assignment]
                                     n_activated=moe.cfg.n_activated_experts + extra)
            if drop_shared:
                moe.shared_experts = None
        yield
    finally:
        for moe, gate, shared in saved:
            moe.gate, moe.shared_experts = gate, shared


__all__ = ["AlteredRouter", "altered_routing"]
