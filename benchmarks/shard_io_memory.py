"""Peak memory per rank of loading a Hugging Face checkpoint straight into FSDP2 shards, and of saving it back
streamed from the ranks, against one process loading and saving the whole model.

Question: does a rank of an N-process model hold ~1/N of the checkpoint while loading and saving (no rank ever
holds the full model)? Writes the mid-size checkpoint (benchmarks/common.py ``mid_size``, bf16, 404M parameters)
to a temporary directory, then in fresh processes measures the growth of VmHWM (peak resident set) over the load,
from after the imports (and the process group) to after it, and over the save (peak reset before it through
/proc/self/clear_refs):

* ``1 process``: ``from_pretrained(path)`` then ``save_pretrained(model, out)``;
* ``N ranks (FSDP2)``: every rank builds the model on meta, lays it out as training does (``shard_model``, the
  default expert-parallel size) over the N gloo ranks while still on meta, ``load_pretrained_sharded`` then
  ``save_pretrained_sharded``: the worst rank.

    python benchmarks/shard_io_memory.py --ranks 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import mid_size

from deepseek_moe.io import save_pretrained
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

CHILD = r"""
import json, os, sys, time
from pathlib import Path
import torch
import deepseek_moe

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

src, out, world = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
if world == 1:
    before = hwm(); t0 = time.perf_counter()
    model = deepseek_moe.from_pretrained(src)
    load_s = time.perf_counter() - t0; load = hwm() - before
    reset_peak(); before = hwm(); t0 = time.perf_counter()
    deepseek_moe.save_pretrained(model, out)
    save_s = time.perf_counter() - t0; save = hwm() - before
    held = sum(t.nbytes for t in model.state_dict().values())
else:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from deepseek_moe.io.load import read_config
    from deepseek_moe.io.streaming import skip_init
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
    from deepseek_moe.parallel import (auto_ep, init_parallel, load_pretrained_sharded, save_pretrained_sharded,
                                       shard_model)
    _, cfg = read_config(src)
    ctx = init_parallel(auto_ep(world, [cfg.moe]))
    before = hwm(); t0 = time.perf_counter()
    with torch.device("meta"), skip_init():
        model = DeepSeekMoEForCausalLM(cfg).to(torch.bfloat16)
    shard_model(model, ctx)  # the training layout: experts over "ep", everything FSDP2-sharded
    load_pretrained_sharded(model, src)
    load_s = time.perf_counter() - t0; load = hwm() - before
    dist.barrier()
    reset_peak(); before = hwm(); t0 = time.perf_counter()
    save_pretrained_sharded(model, out)
    save_s = time.perf_counter() - t0; save = hwm() - before
    held = sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in model.state_dict().values())
print(json.dumps({"load": load, "save": save, "held": held, "load_s": load_s, "save_s": save_s}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(src: Path, out: Path, world: int) -> list[dict[str, float]]:
    """One run on ``world`` processes; each process's numbers."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(out), str(world)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=1200)
        if p.returncode:
            raise RuntimeError(f"a rank failed:\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def write_checkpoint(path: Path) -> int:
    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(mid_size())
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_pretrained(model, path, max_shard_size="400MB")
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="process counts (default 2 4)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shard_io_memory_") as tmp:
        src = Path(tmp) / "src"
        t0 = time.perf_counter()
        size = write_checkpoint(src)
        print(f"wrote {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = {}
        for world in (1, *args.ranks):
            rows[world] = measure(src, Path(tmp) / f"out{world}", world)
    print(f"\n{'processes':<16} {'held/rank':>10} {'load peak/rank':>15} {'/ file':>7} {'save peak/rank':>15} "
          f"{'/ file':>7} {'load s':>7} {'save s':>7}")
    result: dict[str, object] = {"benchmark": "shard_io_memory", "file_bytes": size}
    for world, ranks in rows.items():
        held = max(r["held"] for r in ranks)
        load = max(r["load"] for r in ranks)
        save = max(r["save"] for r in ranks)
        load_s = max(r["load_s"] for r in ranks)
        save_s = max(r["save_s"] for r in ranks)
        name = "1 process" if world == 1 else f"{world} ranks (FSDP2)"
        print(f"{name:<16} {held / 2**20:>6.0f} MiB {load / 2**20:>11.0f} MiB {load / size:>6.2f}x "
              f"{save / 2**20:>11.0f} MiB {save / size:>6.2f}x {load_s:>7.2f} {save_s:>7.2f}")
        result[str(world)] = {"held_bytes": held, "load_peak_bytes": load, "save_peak_bytes": save,
                              "load_ratio": round(load / size, 4), "save_ratio": round(save / size, 4),
                              "load_s": round(load_s, 3), "save_s": round(save_s, 3)}
    print("(peaks: VmHWM growth of the worst rank; held: parameter + buffer bytes the rank holds after the load)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
