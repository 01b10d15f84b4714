"""Process groups for expert parallelism: a (dp, ep) DeviceMesh over the ranks torchrun started.

Ranks r = dp_index * ep_size + ep_index: an expert-parallel group is ep_size consecutive ranks, which hold
consecutive slices of the global batch (what makes the concatenated batch the single-process one). Replicated
parameters are data-parallel over all ranks (DDP); each expert slice is replicated over the ``dp`` dimension.
gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from deepseek_moe.parallel.experts import (
    check_model,
    expert_parameters,
    parallelize_experts,
    scale_expert_grads,
)


@dataclass
class ParallelContext:
    world_size: int
    rank: int
    ep_size: int
    device: torch.device
    mesh: DeviceMesh
    ep_group: dist.ProcessGroup
    expert_dp_group: dist.ProcessGroup  # the replicas of this rank's expert slice (size world / ep)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.ep_group)


def env_world_size() -> int:
    """Processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_parallel(ep_size: int | None = None, *, timeout_s: float = 300.0, backend: str | None = None,
                  device: torch.device | None = None) -> ParallelContext:
    """Join the process group torchrun set up (env://) and build the (dp, ep) mesh.

    ``ep_size`` defaults to every rank. Check the model with :func:`check_expert_parallel` first: a layout that
    does not fit should fail before this. ``timeout_s`` bounds how long a rank waits on a dead peer.
    """
    world = env_world_size()
    ep_size = world if ep_size is None else ep_size
    if ep_size < 1 or world % ep_size != 0:
        raise ValueError(f"expert-parallel size ({ep_size}) must divide the number of processes ({world})")
    if device is None:
        device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available()
                  else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    mesh = init_device_mesh(device.type, (world // ep_size, ep_size), mesh_dim_names=("dp", "ep"))
    ep_group = mesh.get_group("ep")
    if ep_group == dist.group.WORLD:
        # A group of its own, so the expert all-to-alls never interleave with DDP's all-reduces on one group.
        ep_group = dist.new_group(list(range(world)))
    return ParallelContext(world, dist.get_rank(), ep_size, device, mesh, ep_group, mesh.get_group("dp"))


def data_parallel(model: nn.Module, ctx: ParallelContext, *, find_unused_parameters: bool = True) -> nn.Module:
    """Split the experts over ``ctx.ep_group`` and wrap the rest in DDP over all ranks.

    DDP ignores the expert slices (they are not replicas of each other); their gradients are scaled by
    :func:`scale_expert_grads`. Buffers are not broadcast: the routing bias is kept equal on every rank by
    all-reducing its counts (``update_routing_bias(model, all_reduce=all_reduce_sum(None))``), and the pending
    counts are per rank until then. ``find_unused_parameters``: the router gets no gradient under uniform
    routing, and frozen experts none at all.
    """
    check_model(model, ctx.ep_size)
    parallelize_experts(model, ctx.ep_group)
    ignored = [name for name, _ in expert_parameters(model)]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    # Buffers are equal at the start (same seed or checkpoint) and must not be overwritten from rank 0 later.
    no_buffer_sync: dict[str, Any] = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                      inspect.signature(nn.parallel.DistributedDataParallel).parameters else {"broadcast_buffers": False})
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters, **no_buffer_sync)
    scale_expert_grads(model, ctx.world_size, ctx.expert_dp_group)
    return ddp


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
