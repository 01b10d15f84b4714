"""Load a Hugging Face checkpoint straight into the shards of an N-process model and save it back from the ranks.

    torchrun --standalone --nproc-per-node 2 examples/hf_shards.py CKPT OUT

Every rank builds the model on the meta device (nothing allocated), lays it out as training does while still on
meta (``shard_model``: routed experts split over the expert-parallel ranks, everything FSDP2-sharded), then
``load_pretrained_sharded`` allocates its shards and reads only their rows from CKPT's safetensors files. A forward shows the model works; then
``save_pretrained_sharded`` writes OUT in Hugging Face format, each rank streaming the tensors it holds (the
same tensors ``save_pretrained`` would write from one process). Runs on CPU (gloo) or one GPU per rank (NCCL).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from deepseek_moe.io.load import read_config
from deepseek_moe.io.streaming import skip_init
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.moe.all_layers import moe_layers
from deepseek_moe.parallel import (
    auto_ep,
    env_world_size,
    init_parallel,
    load_pretrained_sharded,
    save_pretrained_sharded,
    shard_model,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a Hugging Face checkpoint directory (or a train run's model/)")
    parser.add_argument("out", help="directory to write the checkpoint back to")
    args = parser.parse_args()
    _, cfg = read_config(args.checkpoint)
    with torch.device("meta"), skip_init():
        model = DeepSeekMoEForCausalLM(cfg)  # float32, as the config builds it
    ctx = init_parallel(auto_ep(env_world_size(), [moe.cfg for _, moe in moe_layers(model)]))
    device = ctx.device
    shard_model(model, ctx)
    load_pretrained_sharded(model, args.checkpoint, device=device)

    held = sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in model.state_dict().values())
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ids = torch.arange(8, device=device).remainder(cfg.vocab_size)[None]
    with torch.no_grad():
        logits = model.eval()(ids).logits
    print(f"rank {ctx.rank} (ep {ctx.ep_size}): holds {held / 2**20:.1f} of {total / 2**20:.1f} MiB; "
          f"logits[0, -1, :3] {logits[0, -1, :3].tolist()}", flush=True)
    fmt = save_pretrained_sharded(model, args.out)
    if dist.get_rank() == 0:
        print(f"wrote {args.out} ({fmt})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
