"""Checkpoints that do not depend on the process count: experts gathered into the full state_dict on save,
this rank's slice taken on load. The full state_dict has exactly the keys and shapes of the unsplit model, so a
run on N processes resumes on 1 or M processes, and exports to Hugging Face like any model."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deepseek_moe.moe.all_layers import moe_layers
from deepseek_moe.moe.dispatch import LocalDispatcher
from deepseek_moe.moe.experts import RoutedExperts
from deepseek_moe.parallel.dispatcher import AllToAllDispatcher
from deepseek_moe.parallel.experts import expert_parameters, unwrap


def _ep_group(model: nn.Module) -> dist.ProcessGroup | None:
    for _, moe in moe_layers(unwrap(model)):
        if isinstance(moe.dispatcher, AllToAllDispatcher):
            return moe.dispatcher.group
    return None


def _gather_rows(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate the ranks' slices along dim 0 (all slices have the same shape)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of the unsplit model (a collective: every rank of the expert group must call it)."""
    inner = unwrap(model)
    state = inner.state_dict()
    group = _ep_group(inner)
    if group is None:
        return state
    for name, _ in expert_parameters(inner):
        state[name] = _gather_rows(state[name], group)
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, Any], *, strict: bool = True) -> None:
    """Load an unsplit state_dict into a model whose experts may be split: each rank keeps its slice."""
    inner = unwrap(model)
    state = dict(state)
    for name, moe in moe_layers(inner):
        experts = moe.experts
        for pname in ("w1", "w2", "w3"):
            key = f"{name}.experts.{pname}" if name else f"experts.{pname}"
            if key in state and state[key].shape[0] != experts.n_experts:
                state[key] = state[key][experts.offset:experts.offset + experts.n_experts]
    inner.load_state_dict(state, strict=strict)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with the per-parameter state of expert slices (exp_avg, ...) gathered."""
    state = optimizer.state_dict()
    group = _ep_group(model)
    if group is None:
        return state
    index = _expert_indices(model, optimizer)
    for i in sorted(index):
        entry = state["state"].get(i)
        if entry is None:
            continue
        state["state"][i] = {k: (_gather_rows(v, group) if torch.is_tensor(v) and v.dim() > 0 else v)
                             for k, v in entry.items()}
    return state


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what :func:`full_optimizer_state` wrote (on any number of processes)."""
    state = copy.copy(state)
    state["state"] = dict(state["state"])
    index = _expert_indices(model, optimizer)
    for i, experts in index.items():
        entry = state["state"].get(i)
        if entry is None:
            continue
        state["state"][i] = {k: (v[experts.offset:experts.offset + experts.n_experts]
                                 if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] != experts.n_experts else v)
                             for k, v in entry.items()}
    optimizer.load_state_dict(state)


def _expert_indices(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, RoutedExperts]:
    """Optimizer state index (position over the param groups) of each expert weight -> the experts holding it."""
    owner = {id(p): moe.experts for _, moe in moe_layers(unwrap(model)) for p in moe.experts.parameters()}
    index: dict[int, RoutedExperts] = {}
    i = 0
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) in owner:
                index[i] = owner[id(p)]
            i += 1
    return index


def gathered_model(model: nn.Module) -> nn.Module:
    """A single-process copy of ``model`` with every expert in it and local dispatch (a collective).

    For exporting (``deepseek_moe.io.hf.save_pretrained``), sampling or evaluating on one rank.
    """
    inner = unwrap(model)
    memo: dict[int, Any] = {}
    for _, moe in moe_layers(inner):
        if not isinstance(moe.dispatcher, AllToAllDispatcher):
            continue
        part = moe.experts
        _, inter_dim, dim = part.w1.shape
        with torch.device("meta"):
            full = RoutedExperts(moe.cfg.n_routed_experts, dim, inter_dim)
        full = full.to_empty(device=part.w1.device).to(part.w1.dtype)
        with torch.no_grad():
            for pname in ("w1", "w2", "w3"):
                getattr(full, pname).copy_(_gather_rows(getattr(part, pname), moe.dispatcher.group))
                getattr(full, pname).requires_grad_(getattr(part, pname).requires_grad)
        full.use_grouped_mm = part.use_grouped_mm
        memo[id(part)] = full
        memo[id(moe.dispatcher)] = LocalDispatcher()  # a process group cannot be copied, nor should it be
    return copy.deepcopy(inner, memo)
