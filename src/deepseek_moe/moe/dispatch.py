"""Token dispatch: route token rows to their experts and combine the results.

A dispatcher takes the tokens, the gate's :class:`Routing` and the experts, and returns the gate-weighted sum of
routed expert outputs per token. :class:`LocalDispatcher` runs every expert in this process; the expert-parallel
dispatcher in ``deepseek_moe.parallel`` implements the same call with an all-to-all, so expert parallelism
swaps this object instead of forking the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from deepseek_moe.moe.dropping import capacity_keep_mask, group_budget
from deepseek_moe.moe.experts import RoutedExperts
from deepseek_moe.moe.router import Routing


@dataclass
class DropPlan:
    """What token dropping needs: the budget's capacity factor, the number of expert groups and which tokens
    belong to protected sequences (T,)."""

    capacity_factor: float
    n_groups: int
    protected_T: torch.Tensor
    n_tokens: int | None = None  # tokens the budget is computed over (the global batch); None: this call's T


@dataclass
class Dispatched:
    y_TD: torch.Tensor
    dropped: torch.Tensor  # 0-dim int64: assignments dropped against the budget


class BatchSpan(NamedTuple):
    """Where this call's sequences and (real, unpadded) tokens sit in the batch that the batch-wide decisions
    (dropping, the warm-up draw, batch-scope losses) are computed over."""

    first_sequence: int
    n_sequences: int
    first_token: int
    n_tokens: int


class Dispatcher(Protocol):
    """Runs the routed experts. ``batch_span`` and ``batch_sum`` tell the layer which batch its batch-wide
    decisions cover: this call's locally, the concatenation of the ranks' batches under expert parallelism."""

    def __call__(self, x_TD: torch.Tensor, routing: Routing, experts: RoutedExperts,
                 drop: DropPlan | None) -> Dispatched: ...

    def batch_span(self, n_sequences: int, n_tokens: int) -> BatchSpan: ...

    # Sums a count tensor (no gradient) over the ranks whose batches form one batch; identity locally.
    batch_sum: Callable[[torch.Tensor], torch.Tensor] | None


def flat_assignments(routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert_A, gate_A, token_A) for the T*K assignments, in token-major order."""
    T, K = routing.indices_TK.shape
    token_A = torch.arange(T * K, device=routing.indices_TK.device) // K
    return routing.indices_TK.reshape(-1), routing.weights_TK.reshape(-1), token_A


def drop_over_budget(routing: Routing, drop: DropPlan, n_experts: int) -> torch.Tensor:
    """Bool keep-mask over the T*K assignments (token-major) for a single-process batch."""
    T, K = routing.indices_TK.shape
    expert_A = routing.indices_TK.reshape(-1)
    budget = group_budget(drop.capacity_factor, K, T if drop.n_tokens is None else drop.n_tokens, drop.n_groups)
    return capacity_keep_mask(routing.affinity_TK.reshape(-1), expert_A // (n_experts // drop.n_groups),
                              drop.protected_T.repeat_interleave(K), budget, drop.n_groups)


def _index_add_rows(y_AD: torch.Tensor, token_A: torch.Tensor, n_tokens: int) -> torch.Tensor:
    return torch.zeros(n_tokens, y_AD.shape[1], dtype=y_AD.dtype, device=y_AD.device).index_add_(0, token_A, y_AD)


class _IndexAddRows(torch.autograd.Function):
    """index_add's values and gradient without what autograd's index_add keeps: it saves the (A, D) source for
    its shape (derivatives.yaml's expand_as), 25 MB a V2-Lite layer at 512 tokens held to the backward; the
    gradient of a row is its token's row of the output's gradient, which needs only the indices."""

    @staticmethod
    def forward(ctx: Any, y_AD: torch.Tensor, token_A: torch.Tensor, n_tokens: int) -> torch.Tensor:
        ctx.save_for_backward(token_A)
        return _index_add_rows(y_AD, token_A, n_tokens)

    @staticmethod
    def backward(ctx: Any, dy_TD: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (token_A,) = ctx.saved_tensors
        return dy_TD.index_select(0, token_A), None, None


def combine(y_AD: torch.Tensor, token_A: torch.Tensor, n_tokens: int, *,
            deterministic: bool | None = None) -> torch.Tensor:
    """Sum expert outputs back into their tokens' rows.

    On CPU index_add_ is serial and exact run to run. On CUDA it accumulates with atomics in no fixed order, so
    there (``deterministic`` defaults to True off the CPU) each row goes to its own slot and the slots are summed.
    """
    if deterministic is None:
        deterministic = y_AD.device.type != "cpu"
    if not deterministic:
        if y_AD.requires_grad and torch.is_grad_enabled():
            return _IndexAddRows.apply(y_AD, token_A, n_tokens)
        return _index_add_rows(y_AD, token_A, n_tokens)
    counts_T = torch.bincount(token_A, minlength=n_tokens)
    width = int(counts_T.max()) if token_A.numel() else 1
    # token_A is grouped by expert, not by token: a row's slot is its rank among its token's rows.
    by_token = torch.argsort(token_A, stable=True)
    starts_T = torch.cumsum(counts_T, 0) - counts_T
    rank_A = torch.empty_like(token_A)
    rank_A[by_token] = torch.arange(token_A.numel(), device=token_A.device) - starts_T[token_A[by_token]]
    out = torch.zeros(n_tokens * width, y_AD.shape[1], dtype=y_AD.dtype, device=y_AD.device)
    return out.index_copy(0, token_A * width + rank_A, y_AD).view(n_tokens, width, -1).sum(dim=1)


class LocalDispatcher:
    """All experts in this process: sort assignments by expert, one grouped matmul, weighted sum back.

    No Python loop over tokens or experts. The gate weights multiply the (A, F) activation inside the experts,
    before the down projection, which is cheaper than weighting the (A, D) output.
    """

    batch_sum: Callable[[torch.Tensor], torch.Tensor] | None = None

    def batch_span(self, n_sequences: int, n_tokens: int) -> BatchSpan:
        return BatchSpan(0, n_sequences, 0, n_tokens)

    def __call__(self, x_TD: torch.Tensor, routing: Routing, experts: RoutedExperts,
                 drop: DropPlan | None) -> Dispatched:
        dropped = torch.zeros((), dtype=torch.int64, device=x_TD.device)
        # A batch-1 decode step through the experts' one-token call (RoutedExperts', QuantRoutedExperts'): no sort,
        # count, gather or scatter; None where their fused kernel does not apply.
        one_token = getattr(experts, "one_token", None)
        if drop is None and x_TD.shape[0] == 1 and one_token is not None:
            y_KD = one_token(x_TD, routing.indices_TK[0], routing.weights_TK[0].to(x_TD.dtype))
            if y_KD is not None:
                return Dispatched(y_KD.sum(dim=0, keepdim=True), dropped)
        expert_A, gate_A, token_A = flat_assignments(routing)
        if drop is not None:
            keep_A = drop_over_budget(routing, drop, experts.n_experts)
            dropped = (~keep_A).sum()
            expert_A, gate_A, token_A = expert_A[keep_A], gate_A[keep_A], token_A[keep_A]
        order_A = torch.argsort(expert_A, stable=True)
        token_A = token_A[order_A]  # grouped by expert, ascending token index inside each expert
        counts_E = torch.bincount(expert_A, minlength=experts.n_experts)
        y_AD = experts(x_TD, counts_E, gate_A[order_A].to(x_TD.dtype), rows_A=token_A)
        return Dispatched(combine(y_AD, token_A, x_TD.shape[0]), dropped)
