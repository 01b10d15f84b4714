"""Deterministic initialisation, parameter by parameter, so that any shard of a model can be initialised alone.

Each parameter's values come from its own generator, seeded from (the model's base seed, the parameter's name),
and a stacked-experts weight draws each expert from its own generator (seed, name, expert index). So the
values of a parameter do not depend on which other parameters exist, on the order they are initialised in, or
on where the model lives: a rank of a sharded model generates exactly its experts, and of every other parameter
(one at a time) the full tensor, keeping its rows. The single-process model uses the same draws, so a sharded
model gathered back is the single-process one bit for bit.

``shard_of(p)`` says which part of the full parameter ``p`` holds: ``(local tensor, global offset)``. The default
is the whole tensor; ``deepseek_moe.parallel`` passes the DTensor view (the model never imports
torch.distributed). Values are drawn on the CPU (the same on every device) and copied in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

ShardOf = Callable[[torch.Tensor], tuple[torch.Tensor, tuple[int, ...]]]


def whole(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The default ``shard_of``: a plain tensor holds all of itself."""
    return p, (0,) * p.dim()


def param_seed(seed: int, name: str, index: int | None = None) -> int:
    """A 63-bit seed from (base seed, parameter name[, expert index]): stable across runs, machines and Python
    versions (unlike ``hash``)."""
    key = f"{seed}/{name}" + ("" if index is None else f"/{index}")
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def param_generator(seed: int, name: str, index: int | None = None) -> torch.Generator:
    return torch.Generator().manual_seed(param_seed(seed, name, index))


def draw_seed() -> int:
    """A base seed taken from torch's global generator (one draw), so that ``torch.manual_seed`` keeps deciding
    the model's initialisation. On the CPU explicitly: a meta-device context must not make it a meta tensor."""
    return int(torch.randint(0, 2**62, (1,), device="cpu").item())


def _rows(shape: torch.Size, offset: tuple[int, ...], local: torch.Size) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(offset, local, strict=True))


@torch.no_grad()
def fill(p: torch.Tensor, name: str, seed: int, draw: Callable[[tuple[int, ...], torch.Generator], torch.Tensor],
         *, per_expert: bool = False, shard_of: ShardOf = whole) -> None:
    """Fill this process's part of ``p`` with ``draw(full shape, generator)`` of the full parameter.

    ``per_expert``: dim 0 indexes experts, each drawn alone as ``draw(p.shape[1:], generator(seed, name, e))``,
    so a shard generates only its own experts."""
    local, offset = shard_of(p)
    if local.numel() == 0:
        return
    if not per_expert:
        full = draw(tuple(p.shape), param_generator(seed, name))
        local.copy_(full[_rows(p.shape, offset, local.shape)])
        return
    inner = _rows(p.shape[1:], offset[1:], local.shape[1:])
    for i in range(local.shape[0]):
        e = offset[0] + i
        local[i].copy_(draw(tuple(p.shape[1:]), param_generator(seed, name, e))[inner])


def normal(std: float) -> Callable[[tuple[int, ...], torch.Generator], torch.Tensor]:
    def draw(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
        return torch.empty(shape).normal_(0.0, std, generator=g)
    return draw


def constant(value: float) -> Callable[[tuple[int, ...], torch.Generator], torch.Tensor]:
    def draw(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
        return torch.full(shape, value)
    return draw


def is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


__all__ = ["ShardOf", "constant", "draw_seed", "fill", "is_meta", "normal", "param_generator", "param_seed",
           "whole"]
