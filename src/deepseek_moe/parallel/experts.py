"""Putting a model's routed experts on the expert-parallel mesh dimension.

After :func:`parallelize_experts` each MoE layer's stacked expert weights are DTensors of the single-process
global shape (E, F, D), sharded on the expert dim over "ep" (this rank holds the rows of its ``offset``,
``n_experts`` experts), and the layer dispatches through an :class:`AllToAllDispatcher`. Works on a model
built on the meta device (nothing is allocated) or on a materialised one (each rank keeps its rows of the full
experts it built). ``deepseek_moe.parallel.fsdp.shard_model`` does this and then FSDP-shards everything.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from deepseek_moe.moe.all_layers import moe_layers
from deepseek_moe.parallel.dispatcher import AllToAllDispatcher, CommStats
from deepseek_moe.parallel.plan import check_expert_parallel, expert_shard

if TYPE_CHECKING:
    from deepseek_moe.parallel.runtime import ParallelContext


def check_model(model: nn.Module, ep_size: int) -> None:
    """Every MoE layer of ``model`` fits ``ep_size`` ranks (no process group needed)."""
    for name, moe in moe_layers(model):
        check_expert_parallel(moe.cfg, ep_size, where=f"{name or 'moe'} config")


@torch.no_grad()
def parallelize_experts(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """Make each MoE layer's routed experts DTensors sharded on dim 0 over ``ctx.ep_mesh`` and install the
    all-to-all dispatcher. Returns ``model`` (changed in place).

    The dispatcher's batch-wide decisions (balance-loss statistics, drop budget, warm-up and protected draws)
    cover every rank's batch, and its dropping compares each expert's assignments across the ranks that hold
    the same experts, so any ep gives the single-process result.
    """
    ep_mesh = ctx.ep_mesh
    size, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    check_model(model, size)
    replicas = ctx.expert_dp_group if ctx.world_size // ctx.ep_size > 1 else None
    for _, moe in moe_layers(model):
        experts = moe.experts
        if isinstance(experts.w1, DTensor) or experts.n_experts != moe.cfg.n_routed_experts:
            raise ValueError("parallelize_experts: this layer's experts are already split over ranks")
        shard = expert_shard(moe.cfg, size, rank)
        rows = slice(shard.offset, shard.offset + shard.n_experts)
        for name in ("w1", "w2", "w3"):
            full = getattr(experts, name)
            local = full[rows] if full.is_meta else full[rows].clone()
            sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=full.shape,
                                         stride=full.stride())
            setattr(experts, name, nn.Parameter(sharded, requires_grad=full.requires_grad))
        experts.n_experts, experts.offset = shard.n_experts, shard.offset
        moe.dispatcher = AllToAllDispatcher(ctx.ep_group, moe.cfg.n_expert_groups, batch_group=dist.group.WORLD,
                                            replica_group=replicas)
    return model


def expert_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(full name, parameter) of every routed-expert weight (the parameters split over "ep")."""
    for name, moe in moe_layers(model):
        for pname, p in moe.experts.named_parameters():
            yield f"{name}.experts.{pname}" if name else f"experts.{pname}", p


def comm_stats(model: nn.Module) -> list[CommStats]:
    """The dispatch traffic of each MoE layer since its last reset."""
    return [moe.dispatcher.stats for _, moe in moe_layers(model) if isinstance(moe.dispatcher, AllToAllDispatcher)]


def reset_comm_stats(model: nn.Module) -> None:
    for _, moe in moe_layers(model):
        if isinstance(moe.dispatcher, AllToAllDispatcher):
            moe.dispatcher.reset_stats()


def all_reduce_sum(group: dist.ProcessGroup | None):  # noqa: ANN201  (a Callable[[Tensor], None])
    """An in-place sum over ``group``, e.g. for ``update_routing_bias(model, all_reduce=...)``."""
    def reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, group=group)
    return reduce
