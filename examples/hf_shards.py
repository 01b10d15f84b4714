"""Load a Hugging Face checkpoint straight into the shards of an N-process model and save it back from the ranks.

    torchrun --standalone --nproc-per-node 2 examples/hf_shards.py CKPT OUT

Every rank builds the model on the meta device (nothing allocated), lays it out with FSDP2 (each block and the
root ``fully_shard``-ed over all ranks) while still on meta, then ``load_pretrained_sharded`` allocates its
shards and reads only their rows from CKPT's safetensors files. A forward shows the model works; then
``save_pretrained_sharded`` writes OUT in Hugging Face format, each rank streaming the tensors it holds (the
same tensors ``save_pretrained`` would write from one process). Runs on CPU (gloo) or one GPU per rank (NCCL).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from deepseek_moe.io.load import read_config
from deepseek_moe.io.streaming import skip_init
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.parallel.shard_io import load_pretrained_sharded, save_pretrained_sharded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a Hugging Face checkpoint directory (or a train run's model/)")
    parser.add_argument("out", help="directory to write the checkpoint back to")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))

    _, cfg = read_config(args.checkpoint)
    with torch.device("meta"), skip_init():
        model = DeepSeekMoEForCausalLM(cfg)  # float32, as the config builds it
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    load_pretrained_sharded(model, args.checkpoint, device=device)

    held = sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in model.state_dict().values())
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ids = torch.arange(8, device=device).remainder(cfg.vocab_size)[None]
    with torch.no_grad():
        logits = model.eval()(ids).logits
    print(f"rank {dist.get_rank()}: holds {held / 2**20:.1f} of {total / 2**20:.1f} MiB; "
          f"logits[0, -1, :3] {logits[0, -1, :3].tolist()}", flush=True)
    fmt = save_pretrained_sharded(model, args.out)
    if dist.get_rank() == 0:
        print(f"wrote {args.out} ({fmt})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
