"""How a run spreads over processes: the few points where N processes differ from one, as one object.

The Trainer calls these at fixed places and never asks how many processes there are. ``SingleProcess`` does
nothing at each of them; ``deepseek_moe.parallel.DistributedTraining`` (FSDP2 over all ranks, routed experts
split over an expert-parallel mesh dimension, the model built on the meta device) is the N-process strategy.

Checkpoints go through the strategy too: ``checkpoint_state`` gives the model and optimizer state keyed as in
the single-process model, each process holding its shards (DTensors), which DCP saves and loads on any process
count (``train.checkpoint``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from deepseek_moe.model.init import ShardOf, whole
from deepseek_moe.train.config import TrainConfig
from deepseek_moe.train.errors import TrainError


class Strategy(Protocol):
    @property
    def is_main(self) -> bool:
        """The rank that writes the run directory and logs."""
        ...

    @property
    def device(self) -> torch.device: ...

    def main_first(self) -> contextlib.AbstractContextManager[None]:
        """The main rank runs the block first (creates the run directory, fills caches), the others after it."""
        ...

    @property
    def init_device(self) -> torch.device:
        """Where the Trainer builds the model before ``wrap``: the meta device when ``wrap`` materialises only
        this process's shards."""
        ...

    @property
    def shard_of(self) -> ShardOf:
        """(local tensor, global offset) of a parameter's part in this process (``model.init``)."""
        ...

    def wrap(self, model: nn.Module) -> nn.Module:
        """Lay ``model`` out over the processes (in place; materialised and initialised if it was built on the
        meta device) and return the module to call in training. Build the optimizer from ``model`` afterwards:
        its parameters may be new."""
        ...

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global batch (every process draws the same global batch)."""
        ...

    def is_split(self, batch: torch.Tensor) -> bool:
        """Whether ``local`` splits this batch (else every process computes all of it)."""
        ...

    def mean(self, *values: float) -> list[float]:
        """Means over processes of per-process numbers."""
        ...

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes (a new tensor)."""
        ...

    @property
    def all_reduce(self) -> Callable[[torch.Tensor], None] | None:
        """In-place sum over processes for ``update_routing_bias``; None on one process."""
        ...

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole model's gradient, every process's part included."""
        ...

    def checkpoint_state(self, model: nn.Module,
                         optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model state, optimizer state) as a sharded checkpoint (DCP) stores them: the single-process model's
        keys; values DTensors holding this process's shards, or plain tensors equal on every process; the
        optimizer's as ``{"state": {name: {"exp_avg": ...}}, "param_groups": [{..., "params": [names]}]}``.
        Loading fills these tensors in place, then calls ``load_checkpoint_state``. A fresh optimizer's state is
        allocated (at lr 0), so there is something to load into."""
        ...

    def load_checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                              model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        """Put the filled-in ``checkpoint_state`` dicts back into the model and optimizer."""
        ...

    def gathered(self, model: nn.Module) -> nn.Module:
        """The whole model in one process, for export and sampling on the main rank; a collective."""
        ...

    def close(self) -> None:
        """Wait for every process, then leave the process group."""
        ...


class SingleProcess:
    """One process: every method is the identity or the plain PyTorch call."""

    is_main = True

    def __init__(self, device: torch.device) -> None:
        self._device = device

    @property
    def device(self) -> torch.device:
        return self._device

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        yield

    init_device = torch.device("cpu")
    shard_of = staticmethod(whole)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def is_split(self, batch: torch.Tensor) -> bool:
        return True

    def mean(self, *values: float) -> list[float]:
        return list(values)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    all_reduce = None

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def checkpoint_state(self, model: nn.Module,
                         optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
        from deepseek_moe.parallel.dcp import state_dicts

        return state_dicts(model, optimizer)

    def load_checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                              model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        from deepseek_moe.parallel.dcp import put_state_dicts

        put_state_dicts(model, optimizer, model_state, optimizer_state)

    def gathered(self, model: nn.Module) -> nn.Module:
        return model

    def close(self) -> None:
        pass


def start_strategy(cfg: TrainConfig, device: torch.device) -> Strategy:
    """SingleProcess, or under torchrun (WORLD_SIZE > 1) the expert-parallel strategy. A model or batch that does
    not fit the process count fails here, before any process-group work."""
    from deepseek_moe.parallel import DistributedTraining, env_world_size
    from deepseek_moe.train.build import build_model_config

    world = env_world_size()
    if world == 1:
        return SingleProcess(device)
    try:
        moe = build_model_config(cfg, cfg.data.vocab_size, 0).moe  # the layout does not depend on the vocabulary
        return DistributedTraining.start(moe, cfg.schedule.batch_size, device, ep=cfg.ep)
    except ValueError as e:
        raise TrainError(f"cannot train on {world} processes: {e}") from e


__all__ = ["SingleProcess", "Strategy", "start_strategy"]
