"""Checkpoints that do not depend on the process count: every sharded tensor gathered into the full state_dict
on save, this rank's shard taken on load. The full state_dict has exactly the keys and shapes of the
single-process model, so a run on N processes resumes on 1 or M processes and exports to Hugging Face like any
model. (Gathering is the small-scale path: sharded DCP checkpoints replace it for models that do not fit one
rank.) Generic over any model whose parameters are DTensors or plain tensors (``fsdp.shard_model``'s layout)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from deepseek_moe.moe.all_layers import moe_layers
from deepseek_moe.parallel.fsdp import local_shard


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _piece(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` in ``like``'s layout (a DTensor of the same placements, or ``full``)."""
    if not isinstance(like, DTensor):
        return full
    local, offset = local_shard(like)
    rows = tuple(slice(o, o + n) for o, n in zip(offset, local.shape, strict=True))
    return DTensor.from_local(full[rows].to(local.device, local.dtype).clone(), like.device_mesh, like.placements,
                              run_check=False, shape=like.shape, stride=like.stride())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of the unsharded model (a collective: every rank must call it; every rank gets it)."""
    return {k: _full(v.detach()) for k, v in model.state_dict().items()}


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, Any], *, strict: bool = True) -> None:
    """Load an unsharded state_dict into a sharded model: each rank copies its rows into its shards."""
    own: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers())
    persistent = set(model.state_dict())
    if strict:
        missing, unexpected = sorted(persistent - set(state)), sorted(set(state) - persistent)
        if missing or unexpected:
            raise ValueError(f"state_dict does not match the model: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}")
    for key, value in state.items():
        target = own.get(key)
        if target is None:
            continue
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(target.shape)}")
        local, offset = local_shard(target)
        rows = tuple(slice(o, o + n) for o, n in zip(offset, local.shape, strict=True))
        local.copy_(value[rows])


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in the order optimizer.state_dict() numbers them."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with every sharded per-parameter state (exp_avg, ...) gathered: the state dict of
    the single-process optimizer (a collective)."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: _full(v) if torch.is_tensor(v) else v for k, v in entry.items()}
                      for i, entry in state["state"].items()}
    return state


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what :func:`full_optimizer_state` (or a single-process optimizer) wrote: each rank keeps its rows,
    as DTensors laid out like their parameters."""
    params = _params(optimizer)
    state = copy.copy(state)
    converted = {}
    for i, entry in state["state"].items():
        p = params[int(i)]
        converted[i] = {k: (_piece(v, p) if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) and v.dim() > 0
                            else v) for k, v in entry.items()}
    state["state"] = converted
    optimizer.load_state_dict(state)


def gathered_model(model: nn.Module, *, build: bool = True) -> nn.Module | None:
    """A single-process copy of ``model`` (local dispatch, plain tensors) from its full state (a collective:
    every rank calls it; only those with ``build`` build the copy, the others get None).

    For exporting (``deepseek_moe.io.save_pretrained``), sampling or evaluating on one rank. The copy is built
    on the meta device and filled from the gathered state, so building it draws nothing from the global RNG.
    """
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

    if not isinstance(model, DeepSeekMoEForCausalLM):
        raise TypeError(f"gathered_model builds a DeepSeekMoEForCausalLM, not a {type(model).__name__}")
    state = full_state_dict(model)
    if not build:
        return None
    with torch.device("meta"):
        plain = DeepSeekMoEForCausalLM(model.config, init_seed=model.init_seed)
    device = next(iter(state.values())).device
    plain.to_empty(device=device)
    for _, moe in moe_layers(plain):
        moe.reset_state()
    plain.load_state_dict(state)
    plain.tokenizer = model.tokenizer
    for (_, src), (_, dst) in zip(moe_layers(model), moe_layers(plain), strict=True):
        dst.uniform_routing = src.uniform_routing
        for pname in ("w1", "w2", "w3"):
            getattr(dst.experts, pname).requires_grad_(getattr(src.experts, pname).requires_grad)
    return plain.train(model.training)
