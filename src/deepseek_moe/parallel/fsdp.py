"""FSDP2 (``fully_shard``) composed with expert parallelism on one DeviceMesh, as torchtitan carves it.

    model = shard_model(model, ctx)        experts split over "ep", then fully_shard everything (meta or not)
    materialize(model, ctx.device)         to_empty + the single-process initialisation of this rank's shards
    clip_grad_norm_(model, max_norm)       the global gradient norm over every shard of every mesh

After ``shard_model`` every parameter is a DTensor whose global shape and state_dict key are the
single-process model's: a routed-expert weight (E, F, D) is sharded on dim 0 over "ep" and, within that slice,
over "dp_mod_ep" (FSDP); every other parameter is sharded on dim 0 over all N ranks ("fsdp"). Buffers (the
routing bias, its pending counts) stay plain tensors, equal on every rank.

Gradients: FSDP averages each parameter's gradient over its own mesh. A non-expert gradient is a mean over N
ranks of their batch-slice means: the single-process mean. An expert's gradient on a rank already sums the
contributions of its expert-parallel group's tokens (the all-to-all backward brings them home); FSDP then sums
over the N / ep replicas and must divide by N, not N / ep (``set_gradient_divide_factor``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from deepseek_moe.moe.all_layers import moe_layers
from deepseek_moe.parallel._torch_compat import compute_local_shape_and_global_offset
from deepseek_moe.parallel.experts import check_model, parallelize_experts
from deepseek_moe.parallel.runtime import ParallelContext


def local_shard(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(local tensor, global offset) of a DTensor's part on this rank; a plain tensor is all of itself. The
    ``shard_of`` of ``deepseek_moe.model.init``."""
    if not isinstance(p, DTensor):
        return p, (0,) * p.dim()
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return p.to_local(), tuple(offset)


def shard_model(model: nn.Module, ctx: ParallelContext, *, reshard_after_forward: bool = True) -> nn.Module:
    """Expert parallelism over "ep", then FSDP2: routed experts over "dp_mod_ep", each transformer block and MTP
    module, the embedding and the head (when untied) and the root over all ranks. In place; returns ``model``.

    Call it on a model built on the meta device (then :func:`materialize`, or fill the shards from files) or on
    a materialised one whose weights are equal on every rank (each keeps its shards). Build the optimizer from
    the model afterwards: its parameters are new objects.
    """
    check_model(model, ctx.ep_size)
    parallelize_experts(model, ctx)
    # The experts' custom divide factor is a pre-multiplied sum, which gloo lacks: sum, then divide (on NCCL
    # PreMulSum does both in one pass). The other modules average, which gloo has.
    force_sum = dist.get_backend() != "nccl"
    for _, moe in moe_layers(model):
        fully_shard(moe.experts, mesh=ctx.dp_mod_ep_mesh, reshard_after_forward=reshard_after_forward)
        experts: FSDPModule = moe.experts  # type: ignore[assignment]
        experts.set_gradient_divide_factor(float(ctx.world_size))
        # Not on a 1-rank mesh: there torch 2.13 divides by the factor in its no-communication copy and again
        # after it when sums are forced (there is no reduction to force anyway).
        if force_sum and ctx.dp_mod_ep_mesh.size() > 1:
            experts.set_force_sum_reduction_for_comms(True)
    # each block, and each multi-token-prediction module (its block, projection and norms) as one unit
    for block in [*getattr(model, "layers", []), *getattr(model, "mtp", [])]:
        fully_shard(block, mesh=ctx.fsdp_mesh, reshard_after_forward=reshard_after_forward)
    embed, head = getattr(model, "embed", None), getattr(model, "head", None)
    tied = embed is not None and head is not None and head.weight is embed.weight
    if not tied:  # a tied pair stays with the root, which owns both modules
        for module in (embed, head):
            if module is not None:
                fully_shard(module, mesh=ctx.fsdp_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=ctx.fsdp_mesh, reshard_after_forward=reshard_after_forward)
    return model


def materialize(model: nn.Module, device: torch.device, *, init: bool = True) -> nn.Module:
    """Allocate this rank's shards on ``device`` (``to_empty``) and, with ``init``, fill them with the
    single-process initialisation (``model.reset_parameters(shard_of=local_shard)``, which also resets the
    buffers). Without ``init`` the shards are uninitialised memory, to be filled from a checkpoint."""
    model.to_empty(device=device)
    if init:
        reset = getattr(model, "reset_parameters", None)
        if reset is None:
            raise TypeError(f"{type(model).__name__} has no reset_parameters(shard_of=...) to initialise its shards")
        reset(shard_of=local_shard)
    else:  # buffers are no shards: they start at their defined values (zero counts, zero routing bias)
        for _, moe in moe_layers(model):
            moe.reset_state()
    return model


def _replicas(t: torch.Tensor, world: int) -> int:
    """On how many ranks each element of ``t`` lives (a plain tensor: on all of them)."""
    if not isinstance(t, DTensor):
        return world
    mesh = t.device_mesh
    return math.prod(mesh.size(i) for i, pl in enumerate(t.placements) if pl.is_replicate())


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model, whatever mesh each gradient is sharded on.

    torch's version stacks the per-parameter norms, which fails for DTensors on two meshes (experts on
    ("dp_mod_ep", "ep"), the rest on "fsdp"). Here each rank sums the squares of its local shards (an element
    held on several ranks counted once), one all-reduce over ``group`` (default all ranks) gives the global
    norm, and every rank scales its shards by the same factor. Returns the norm before clipping.
    """
    world = dist.get_world_size(group)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    device = next((local_shard(g)[0].device for g in grads), torch.device("cpu"))
    if dist.get_backend(group) == "gloo":
        device = torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        local = local_shard(g)[0]
        sq += local.detach().double().pow(2).sum().to(device) / _replicas(g, world)
    dist.all_reduce(sq, group=group)  # every rank takes part, even one without gradients
    total = sq.sqrt().float()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        local = local_shard(g)[0]
        local.mul_(coef.to(local.device, local.dtype))
    return total


__all__ = ["clip_grad_norm_", "local_shard", "materialize", "shard_model"]
