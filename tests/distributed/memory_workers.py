"""What each rank runs in test_memory_shards.py: the tiny model built on meta, laid out by parallel.shard_model,
materialised, one AdamW step; each rank returns the bytes its shards hold (parameters, gradients, optimizer
state), counted from the DTensors' local tensors, for the test to compare with model.memory's arithmetic."""

from __future__ import annotations

import os
from typing import Any

import torch
from harness import rank_main

from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.parallel import init_parallel, local_shard, materialize, shard_model
from deepseek_moe.presets import tiny
from deepseek_moe.train.config import OptimConfig
from deepseek_moe.train.optim import build_optimizer


def _bytes(t: torch.Tensor) -> int:
    local = local_shard(t)[0]
    return local.numel() * local.element_size()


def shards(rank: int, world: int) -> dict[str, Any]:
    ctx = init_parallel(int(os.environ["MEMORY_EP"]), timeout_s=120)
    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(tiny(), init_seed=0)
    shard_model(model, ctx)
    materialize(model, ctx.device)
    optimizer = build_optimizer(model, OptimConfig())
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(rank))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    params = list(model.parameters())
    return {"rank": ctx.rank, "ep": ctx.ep_size, "tensors": len(params),
            "params": sum(_bytes(p) for p in params),
            "grads": sum(_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(_bytes(v) for state in optimizer.state.values() for v in state.values()
                             if isinstance(v, torch.Tensor))}


def main(worker: str) -> None:
    rank_main(globals(), worker)
