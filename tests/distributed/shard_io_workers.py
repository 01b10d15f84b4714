"""What each rank runs in test_shard_io.py: lay a tiny model out over the ranks while it is on meta, load a
Hugging Face checkpoint straight into the shards, gather it back, and save it streamed from the ranks.

The checkpoint (``SHARDIO_SRC``) is written by the test process from a single-process model; each worker returns
the gathered state, the bytes it read from the files, and what the test compares with the one-process model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from harness import rank_main
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from deepseek_moe.io.load import read_config
from deepseek_moe.io.safetensors_file import SafetensorsFile
from deepseek_moe.io.streaming import skip_init
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.moe.all_layers import moe_layers
from deepseek_moe.parallel.shard_io import load_pretrained_sharded, save_pretrained_sharded

_read_bytes = 0


def _count_reads() -> None:
    """Count the bytes this rank reads from checkpoint files (every read goes through read_bytes_into)."""
    original = SafetensorsFile.read_bytes_into

    def counting(self: SafetensorsFile, out: torch.Tensor, offset: int) -> None:
        global _read_bytes
        _read_bytes += out.numel() * out.element_size()
        original(self, out, offset)

    SafetensorsFile.read_bytes_into = counting  # type: ignore[method-assign]


def _meta_model(src: Path) -> DeepSeekMoEForCausalLM:
    _, cfg = read_config(src)
    with torch.device("meta"), skip_init():
        return DeepSeekMoEForCausalLM(cfg)


def _gathered(model: nn.Module) -> dict[str, torch.Tensor]:
    """The global state_dict, each DTensor gathered (one tensor at a time: a test of a tiny model)."""
    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
            for name, t in model.state_dict().items()}


def _local_bytes(model: nn.Module) -> int:
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in model.state_dict().values())


def fsdp(rank: int, world: int) -> dict[str, Any]:
    """FSDP2 over all ranks (uneven Shard(0): the vocabulary is odd); then a forward and the streamed save."""
    src, out = Path(os.environ["SHARDIO_SRC"]), Path(os.environ["SHARDIO_OUT"])
    dist.init_process_group("gloo")
    model = _meta_model(src)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _count_reads()
    load_pretrained_sharded(model, src)
    read = _read_bytes
    state = _gathered(model)
    ids = torch.arange(2 * 7).remainder(model.config.vocab_size).view(2, 7)
    with torch.no_grad():
        logits = model.eval()(ids).logits  # FSDP gathers each block's parameters from the loaded shards
    fmt = save_pretrained_sharded(model, out)
    return {"state": state, "read": read, "local_bytes": _local_bytes(model), "logits": logits, "format": fmt}


def expert_mesh(rank: int, world: int) -> dict[str, Any]:
    """The training layout (``shard_model`` on meta: routed experts Shard(0) over "ep" = 2, then fully_shard over
    "dp_mod_ep" = world / 2: _StridedShard, uneven with 6 experts; the rest over all ranks): loaded, gathered,
    run (all-to-all dispatch) and saved. Then the experts fully_shard-ed on their hidden dim instead (Shard(1):
    boxes that are not whole rows), loaded and gathered."""
    from deepseek_moe.parallel import init_parallel, shard_model

    src = Path(os.environ["SHARDIO_SRC"])
    ctx = init_parallel(2)
    results: dict[str, Any] = {}
    model = _meta_model(src)
    shard_model(model, ctx)
    load_pretrained_sharded(model, src)
    ids = torch.arange(2 * 7).remainder(model.config.vocab_size).view(2, 7)
    with torch.no_grad():
        logits = model.eval()(ids).logits  # every rank the same two sequences, experts exchanged all-to-all
    save_pretrained_sharded(model, Path(os.environ["SHARDIO_OUT"]))
    results["strided"] = {"state": _gathered(model), "placements": str(model.layers[1].ffn.experts.w1.placements),
                          "logits": logits}

    model = _meta_model(src)
    for _, moe in moe_layers(model):
        experts = moe.experts
        for leaf, p in list(experts.named_parameters()):
            setattr(experts, leaf, nn.Parameter(distribute_tensor(p.data, ctx.mesh["ep"], [Shard(0)])))
        fully_shard(experts, mesh=ctx.mesh["dp_mod_ep"], shard_placement_fn=lambda p: Shard(1))
    for block in model.layers:
        fully_shard(block, mesh=ctx.fsdp_mesh)
    fully_shard(model, mesh=ctx.fsdp_mesh)
    load_pretrained_sharded(model, src)
    results["columns"] = {"state": _gathered(model), "placements": str(model.layers[1].ffn.experts.w1.placements)}
    return results


def expert_parallel(rank: int, world: int) -> dict[str, Any]:
    """Expert parallelism alone (``parallelize_experts``: expert DTensors sharded over "ep", the rest plain and
    replicated): the streamed save writes each expert from the rank holding it."""
    import deepseek_moe
    from deepseek_moe.parallel import init_parallel, parallelize_experts

    src, out = Path(os.environ["SHARDIO_SRC"]), Path(os.environ["SHARDIO_OUT"])
    ctx = init_parallel()
    model = deepseek_moe.from_pretrained(src)
    parallelize_experts(model, ctx)
    return {"format": save_pretrained_sharded(model, out), "experts": model.layers[1].ffn.experts.n_experts}


def main(worker: str) -> None:
    rank_main(globals(), worker)
