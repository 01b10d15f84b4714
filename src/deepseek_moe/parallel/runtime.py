"""Process groups: one 2-D DeviceMesh ("dp_mod_ep", "ep") over the ranks torchrun started.

Rank r = dp_mod_ep_index * ep + ep_index: an expert-parallel group is ``ep`` consecutive ranks, which hold
consecutive slices of the global batch. Every rank is a data-parallel rank: the non-expert parameters are
sharded (FSDP2) over all N ranks, the mesh flattened into one dimension named "fsdp"; the routed experts are
split over "ep" and each slice FSDP-sharded over "dp_mod_ep" (the N / ep ranks holding the same experts).
gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from deepseek_moe.config import MoEConfig
from deepseek_moe.parallel.plan import check_expert_parallel


@dataclass
class ParallelContext:
    world_size: int
    rank: int
    ep_size: int
    device: torch.device
    mesh: DeviceMesh  # 2-D: ("dp_mod_ep", "ep")
    fsdp_mesh: DeviceMesh  # 1-D over all ranks: "fsdp" (the mesh flattened)
    ep_group: dist.ProcessGroup  # this rank's expert-parallel group (the all-to-alls)
    expert_dp_group: dist.ProcessGroup  # the ranks holding this rank's experts (size world / ep)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.ep_group)

    @property
    def ep_mesh(self) -> DeviceMesh:
        return self.mesh["ep"]

    @property
    def dp_mod_ep_mesh(self) -> DeviceMesh:
        return self.mesh["dp_mod_ep"]


def env_world_size() -> int:
    """Processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def auto_ep(world: int, moes: Iterable[MoEConfig]) -> int:
    """The expert-parallel size chosen by default: the largest divisor of ``world`` that divides every MoE layer's
    ``n_expert_groups`` (``world`` itself when it does) and that the layers' device limit allows. Every rank is
    data-parallel whatever ep is, so a larger ep only spreads the experts thinner."""
    moes = list(moes)
    for ep in sorted((d for d in range(1, world + 1) if world % d == 0), reverse=True):
        try:
            for cfg in moes:
                check_expert_parallel(cfg, ep)
        except ValueError:
            continue
        return ep
    return 1


def check_ep(ep_size: int, world: int) -> None:
    if not isinstance(ep_size, int) or ep_size < 1 or world % ep_size != 0:
        raise ValueError(f"expert-parallel size ep ({ep_size!r}) must be a positive divisor of the number of "
                         f"processes ({world})")


def init_parallel(ep_size: int | None = None, *, timeout_s: float = 300.0, backend: str | None = None,
                  device: torch.device | None = None) -> ParallelContext:
    """Join the process group torchrun set up (env://) and build the ("dp_mod_ep", "ep") mesh.

    ``ep_size`` defaults to every rank (pass :func:`auto_ep`'s choice for a model). Check the model with
    :func:`check_expert_parallel` first: a layout that does not fit should fail before this. ``timeout_s``
    bounds how long a rank waits on a dead peer.
    """
    world = env_world_size()
    ep_size = world if ep_size is None else ep_size
    check_ep(ep_size, world)
    if device is None:
        device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available()
                  else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    mesh = init_device_mesh(device.type, (world // ep_size, ep_size), mesh_dim_names=("dp_mod_ep", "ep"))
    fsdp_mesh = mesh[("dp_mod_ep", "ep")]._flatten("fsdp")
    ep_group = mesh.get_group("ep")
    if ep_group == dist.group.WORLD:
        # A group of its own, so the expert all-to-alls never interleave with FSDP's collectives on one group.
        ep_group = dist.new_group(list(range(world)))
    return ParallelContext(world, dist.get_rank(), ep_size, device, mesh, fsdp_mesh, ep_group,
                           mesh.get_group("dp_mod_ep"))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
