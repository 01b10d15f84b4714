"""Bytes a rank moves per training step on the (dp_mod_ep, ep) mesh: the experts' all-to-alls and FSDP's
all-gathers and reduce-scatters. Pure arithmetic; the layout is that of :mod:`deepseek_moe.model.memory`.

All-to-all (``deepseek_moe.parallel.AllToAllDispatcher``): a token is sent at most once to each rank holding any of
its experts, as one row of its hidden state and the gates of its experts there (k = min(K, E/ep) slots, in the
compute dtype) plus fp32 metadata (k expert ids; with token dropping k affinities and a protected flag too), and
one row of D comes back. The backward sends the gradients of both the other way: (D + k) and D elements. Rows to
the sender itself cost nothing. So per MoE layer and token, with r remote ranks reached:

    forward   r * ((D + k) * c + 4 * meta + D * c)       backward   r * (D * c + (D + k) * c)

and activation checkpointing per block runs the forward's pair again in the backward. ``r`` is at most
min(M, K, ep - 1) (device-limited routing: M groups, so at most M ranks); :func:`expected_ranks_per_token` gives
its mean when a token's M groups are a uniformly random M-subset and its K experts uniformly random among theirs.

FSDP: a unit's parameters are all-gathered in the forward and again in the backward (reshard_after_forward), and
its gradients reduce-scattered once, over the ranks that shard it (N for non-expert parameters, N/ep for routed
experts); a ring moves (n - 1) / n of the gathered bytes into each rank. Per micro-batch: gradient accumulation
without ``set_requires_gradient_sync(False)`` repeats everything per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.model.counting import parameter_shapes
from deepseek_moe.model.memory import MeshLayout, Precision

FP32 = 4


def expected_ranks_per_token(moe: MoEConfig, ep: int) -> float:
    """Mean number of ranks (itself included) a token reaches when its M groups are a uniformly random M-subset
    of the G groups (ep ranks holding G/ep each) and its K experts a uniformly random K-subset of those groups'."""
    G, M, K, e = moe.n_expert_groups, moe.n_limited_groups, moe.n_activated_experts, moe.experts_per_group
    g = G // ep
    p_reached = 0.0
    for j in range(min(g, M) + 1):  # j of the token's M groups on this rank: hypergeometric
        p_j = comb(g, j) * comb(G - g, M - j) / comb(G, M)
        p_reached += p_j * (1 - comb((M - j) * e, K) / comb(M * e, K))
    return ep * p_reached


def max_remote_ranks_per_token(moe: MoEConfig, ep: int) -> int:
    """The device-limited bound on the other ranks one token is sent to."""
    return min(moe.n_limited_groups, moe.n_activated_experts, ep - 1)


@dataclass(frozen=True)
class AllToAll:
    """One MoE layer's all-to-all traffic per token, from the sending rank's side."""

    remote_ranks: float  # other ranks a token is sent to
    dispatch_row_bytes: int  # hidden state + gates + metadata
    combine_row_bytes: int
    gradient_row_bytes: int  # the backward's two rows, per (token, remote rank)
    recompute: bool  # activation checkpointing repeats the forward in the backward

    @property
    def forward_bytes(self) -> float:
        return self.remote_ranks * (self.dispatch_row_bytes + self.combine_row_bytes)

    @property
    def bytes_per_token(self) -> float:
        """Forward (twice with recomputation) plus backward."""
        return (2 if self.recompute else 1) * self.forward_bytes + self.remote_ranks * self.gradient_row_bytes


def all_to_all(cfg: ModelConfig, mesh: MeshLayout, precision: Precision, *, checkpointing: bool,
               bound: bool = False, dropping: bool | None = None) -> AllToAll:
    """Per-token traffic of one MoE layer: the mean under uniform routing (:func:`expected_ranks_per_token`),
    or the device-limited worst case with ``bound``. ``dropping`` (default: the config's capacity_factor is set)
    adds the dropping metadata."""
    mesh.check(cfg)
    moe, c, D = cfg.moe, precision.compute, cfg.dim
    if mesh.ep == 1:
        remote = 0.0
    elif bound:
        remote = float(max_remote_ranks_per_token(moe, mesh.ep))
    else:  # the token's own rank is any of the ep ranks alike, so (ep - 1) / ep of the rows leave it
        remote = expected_ranks_per_token(moe, mesh.ep) * (mesh.ep - 1) / mesh.ep
    k = min(moe.n_activated_experts, moe.n_routed_experts // mesh.ep)
    drops = moe.capacity_factor is not None if dropping is None else dropping
    meta = k + (k + 1 if drops else 0)
    return AllToAll(remote, (D + k) * c + FP32 * meta, D * c, (2 * D + k) * c, checkpointing)


def all_to_all_bytes(cfg: ModelConfig, mesh: MeshLayout, precision: Precision, *, tokens: int,
                     checkpointing: bool, bound: bool = False) -> float:
    """Bytes one rank sends in the all-to-alls of a micro-batch of ``tokens`` tokens, all MoE layers."""
    per_layer = all_to_all(cfg, mesh, precision, checkpointing=checkpointing, bound=bound)
    return tokens * cfg.n_moe_layers * per_layer.bytes_per_token


@dataclass(frozen=True)
class FSDPTraffic:
    """Bytes one rank receives in FSDP's collectives per micro-batch."""

    all_gather_bytes: float
    reduce_scatter_bytes: float
    expert_all_gather_bytes: float  # the routed experts' share of all_gather_bytes

    @property
    def total_bytes(self) -> float:
        return self.all_gather_bytes + self.reduce_scatter_bytes


def fsdp_traffic(cfg: ModelConfig, mesh: MeshLayout, precision: Precision) -> FSDPTraffic:
    mesh.check(cfg)
    dense = experts = 0.0
    for p in parameter_shapes(cfg):
        if p.routed_expert:  # this ep rank's slice, gathered over the N/ep ranks holding it
            experts += p.numel / mesh.ep * (mesh.dp_mod_ep - 1) / mesh.dp_mod_ep
        else:
            dense += p.numel * (mesh.world - 1) / mesh.world
    gathered = dense + experts
    return FSDPTraffic(2 * gathered * precision.compute, gathered * precision.reduce, 2 * experts * precision.compute)


__all__ = ["AllToAll", "FSDPTraffic", "all_to_all", "all_to_all_bytes", "expected_ranks_per_token",
           "fsdp_traffic", "max_remote_ranks_per_token"]
