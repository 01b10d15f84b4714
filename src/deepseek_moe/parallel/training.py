"""What a training loop needs to run on the N processes torchrun started, in one object: the N-process
``deepseek_moe.train.strategy.Strategy`` (its one-process twin, ``SingleProcess``, does nothing).

The N-process run reproduces the 1-process run: every rank draws the same global batch of ``batch_size``
sequences (same seed, same order) and keeps its 1/N slice; the MoE layers take their batch-wide decisions over
all ranks' slices; the model is built on the meta device, FSDP2-sharded with its experts split over "ep"
(``parallel.fsdp``), and each rank initialises only its shards, equal to the single-process initialisation.
So ``schedule.batch_size`` stays the global batch and must be a multiple of N.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deepseek_moe.config import MoEConfig
from deepseek_moe.model.init import ShardOf
from deepseek_moe.parallel.checkpoint import gathered_model
from deepseek_moe.parallel.dcp import put_state_dicts, state_dicts
from deepseek_moe.parallel.experts import all_reduce_sum
from deepseek_moe.parallel.fsdp import clip_grad_norm_, local_shard, materialize, shard_model
from deepseek_moe.parallel.plan import check_expert_parallel
from deepseek_moe.parallel.runtime import (
    ParallelContext,
    auto_ep,
    check_ep,
    env_world_size,
    init_parallel,
    shutdown,
)


def check_training_layout(moe: MoEConfig, batch_size: int, world: int, ep: int | None = None) -> int:
    """The expert-parallel size to train with (``ep``, or :func:`auto_ep`'s choice when None or 0); ValueError
    (naming the field) when ``world`` processes cannot train this model that way. No process group."""
    if ep:
        check_ep(ep, world)
        check_expert_parallel(moe, ep, where="model.moe")
    else:
        ep = auto_ep(world, [moe])
    if batch_size % world != 0:
        raise ValueError(f"schedule.batch_size ({batch_size}) must be a multiple of the number of processes "
                         f"({world}): it is the global batch, and each process takes an equal slice of it")
    return ep


class DistributedTraining:
    """FSDP2 over all ranks with the routed experts split over "ep". Build with :meth:`start`."""

    init_device = torch.device("meta")  # the Trainer builds the model here; wrap() materialises the shards
    shard_of: ShardOf = staticmethod(local_shard)

    def __init__(self, ctx: ParallelContext) -> None:
        self.ctx = ctx
        self.world, self.rank = ctx.world_size, ctx.rank

    @classmethod
    def start(cls, moe: MoEConfig, batch_size: int, device: torch.device, *, ep: int | None = None,
              timeout_s: float = 300.0) -> DistributedTraining:
        """Under torchrun: check the layout, then join the process group (gloo on CPU; NCCL on CUDA, one GPU per
        rank: cuda:LOCAL_RANK). ``ep`` None or 0: automatic."""
        world = env_world_size()
        if world == 1:
            raise ValueError("DistributedTraining needs the processes torchrun starts (WORLD_SIZE is 1)")
        ep = check_training_layout(moe, batch_size, world, ep)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return cls(init_parallel(ep, timeout_s=timeout_s, device=device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def describe(self) -> str:
        return (f"{self.world} processes: FSDP2 over all, routed experts split over ep={self.ctx.ep_size} "
                f"(each slice sharded over {self.world // self.ctx.ep_size})")

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (fills caches), the others after it (read them). If rank 0 fails in it,
        the others stay at the barrier until torchrun stops them."""
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main:
            dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard ``model`` (in place; see ``parallel.fsdp``) and, when it was built on the meta device,
        materialise this rank's shards with the single-process initialisation. Returns ``model``. Build the
        optimizer afterwards: the parameters are new (DTensors)."""
        on_meta = any(p.is_meta for p in model.parameters())
        shard_model(model, self.ctx)
        if on_meta:
            materialize(model, self.device)
        return model

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch (rows); a batch the ranks cannot share equally is kept whole,
        so every rank computes it (evaluation's last, shorter batch)."""
        if batch.shape[0] % self.world != 0:
            return batch
        n = batch.shape[0] // self.world
        return batch[self.rank * n:(self.rank + 1) * n]

    def is_split(self, batch: torch.Tensor) -> bool:
        return batch.shape[0] % self.world == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().to(self.device, torch.float64 if t.is_floating_point() else t.dtype).clone()
        dist.all_reduce(out)
        return out.to(t.device, t.dtype)

    def mean(self, *values: float) -> list[float]:
        return (self.sum(torch.tensor(values, dtype=torch.float64)) / self.world).tolist()

    @property
    def all_reduce(self) -> Callable[[torch.Tensor], None]:
        """In-place sum over every rank, for ``update_routing_bias(model, all_reduce=...)``."""
        return all_reduce_sum(None)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(model, max_norm)

    # ---- checkpoints (train.checkpoint): DCP saves and loads each rank's shards, on any process count ----
    def checkpoint_state(self, model: nn.Module,
                         optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model state, optimizer state) keyed as the single-process model, the parameters and their AdamW
        moments as the DTensors FSDP2 and "ep" made them; no communication."""
        return state_dicts(model, optimizer)

    def load_checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                              model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        put_state_dicts(model, optimizer, model_state, optimizer_state)

    def gathered(self, model: nn.Module) -> nn.Module:
        """The unsharded model with local dispatch on the main rank (a collective; the other ranks get
        ``model`` back), for export and sampling."""
        plain = gathered_model(model, build=self.is_main)
        return plain if plain is not None else model

    def close(self) -> None:
        """Wait for every rank (rank 0 writes the run's outputs meanwhile), then leave the process group."""
        dist.barrier()
        shutdown()
