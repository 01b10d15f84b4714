"""Putting a model's routed experts on an expert-parallel group, and the gradient bookkeeping that follows.

After :func:`parallelize_experts` each MoE layer holds only its rank's slice of routed experts and an
:class:`AllToAllDispatcher`; everything else stays replicated. Expert gradients then already sum over the
tokens of every rank of the expert-parallel group (the all-to-all backward brings them home), so they are
scaled, not all-reduced, to match data-parallel averaging of the replicated parameters.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from deepseek_moe.moe.all_layers import moe_layers
from deepseek_moe.moe.experts import RoutedExperts
from deepseek_moe.parallel.dispatcher import AllToAllDispatcher, CommStats
from deepseek_moe.parallel.plan import check_expert_parallel, expert_shard


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def check_model(model: nn.Module, ep_size: int) -> None:
    """Every MoE layer of ``model`` fits ``ep_size`` ranks (no process group needed)."""
    for name, moe in moe_layers(unwrap(model)):
        check_expert_parallel(moe.cfg, ep_size, where=f"{name or 'moe'} config")


@torch.no_grad()
def parallelize_experts(model: nn.Module, ep_group: dist.ProcessGroup) -> nn.Module:
    """Replace each MoE layer's routed experts by this rank's slice and its dispatcher by an all-to-all one.

    Every rank must have built ``model`` with the same weights (same seed, or the same checkpoint loaded):
    each keeps its slice of the full experts it built. Returns ``model`` (changed in place).
    """
    size, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    check_model(model, size)
    for _, moe in moe_layers(unwrap(model)):
        full = moe.experts
        if full.n_experts != moe.cfg.n_routed_experts:
            raise ValueError("parallelize_experts: this layer's experts are already split over ranks")
        shard = expert_shard(moe.cfg, size, rank)
        _, inter_dim, dim = full.w1.shape
        with torch.device("meta"):  # no initialisation draw: the weights are copied in below
            local = RoutedExperts(shard.n_experts, dim, inter_dim, offset=shard.offset)
        local = local.to_empty(device=full.w1.device).to(full.w1.dtype)
        for name in ("w1", "w2", "w3"):
            getattr(local, name).copy_(getattr(full, name)[shard.offset:shard.offset + shard.n_experts])
            getattr(local, name).requires_grad_(getattr(full, name).requires_grad)
        local.use_grouped_mm = full.use_grouped_mm
        moe.experts = local
        moe.dispatcher = AllToAllDispatcher(ep_group, moe.cfg.n_expert_groups)
    return model


def expert_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(full name, parameter) of every routed-expert weight (the parameters that are sharded, not replicated)."""
    for name, moe in moe_layers(unwrap(model)):
        for pname, p in moe.experts.named_parameters():
            yield f"{name}.experts.{pname}" if name else f"experts.{pname}", p


def comm_stats(model: nn.Module) -> list[CommStats]:
    """The dispatch traffic of each MoE layer since its last reset."""
    stats = []
    for _, moe in moe_layers(unwrap(model)):
        if isinstance(moe.dispatcher, AllToAllDispatcher):
            stats.append(moe.dispatcher.stats)
    return stats


def reset_comm_stats(model: nn.Module) -> None:
    for _, moe in moe_layers(unwrap(model)):
        if isinstance(moe.dispatcher, AllToAllDispatcher):
            moe.dispatcher.reset_stats()


def scale_expert_grads(model: nn.Module, data_size: int,
                       expert_dp_group: dist.ProcessGroup | None = None) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook the expert weights so their gradients match averaging the loss over ``data_size`` ranks.

    A rank's expert gradient is the sum of the contributions of every rank in its expert-parallel group; the
    replicated parameters get the mean over all ``data_size`` ranks (DDP), so the experts are divided by
    ``data_size``, after summing over the replicas of this slice (``expert_dp_group``) when there are several.
    """
    handles = []
    for _, p in expert_parameters(model):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            grad = grad / data_size
            if expert_dp_group is not None and dist.get_world_size(expert_dp_group) > 1:
                dist.all_reduce(grad, group=expert_dp_group)
            return grad
        handles.append(p.register_hook(hook))
    return handles


def clip_grad_norm_(model: nn.Module, max_norm: float, ep_group: dist.ProcessGroup) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole model although experts are sharded: the squared norms of
    the expert slices are summed over the expert-parallel group, so every rank clips by the same factor."""
    sharded = {id(p) for _, p in expert_parameters(model)}
    grads = [(id(p) in sharded, p.grad.detach()) for p in unwrap(model).parameters() if p.grad is not None]
    dev = grads[0][1].device if grads else torch.device("cpu")
    replicated_sq = torch.zeros((), device=dev, dtype=torch.float32)
    sharded_sq = torch.zeros((), device=dev, dtype=torch.float32)
    for is_sharded, g in grads:
        sq = g.float().pow(2).sum().to(dev)
        if is_sharded:
            sharded_sq += sq
        else:
            replicated_sq += sq
    dist.all_reduce(sharded_sq, group=ep_group)  # every rank takes part, even one without gradients
    total = (replicated_sq + sharded_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for _, g in grads:
        g.mul_(coef.to(g.device))
    return total


def all_reduce_sum(group: dist.ProcessGroup | None):  # noqa: ANN201  (a Callable[[Tensor], None])
    """An in-place sum over ``group``, e.g. for ``update_routing_bias(model, all_reduce=...)``."""
    def reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, group=group)
    return reduce
