"""Peak memory of loading a checkpoint, the way a user feels it.

Question: how much resident memory does ``from_pretrained`` add, relative to the checkpoint's size on disk?
Writes a DeepSeek-V2-shaped checkpoint of >= --gb gigabytes (bf16, sharded) to a temporary directory, then
loads it in fresh child processes and reports the growth of VmHWM (peak resident set, file-backed pages
included) from after the imports to after the load, over the total size of the ``*.safetensors`` files.
Rows, each run in its own child, interleaved over --repeats rounds:

* ``ours, as stored``: ``from_pretrained(path)``: kept in the files' dtype (the issue's bound: <= 1.2x);
* ``ours, to float32``: ``from_pretrained(path, dtype=torch.float32)``: the model alone is 2x the file;
* ``safetensors.load_file``: the library's own read of every shard into a state dict, every byte touched,
  for comparison; nothing is built from it.

    python benchmarks/load_memory.py --gb 1.1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.io import save_pretrained
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM


def checkpoint_config(gb: float) -> ModelConfig:
    """DeepSeek-V2-Lite's shapes at half width, with as many MoE layers as it takes to reach ``gb`` in bf16."""
    dim, n_experts, width = 1024, 32, 704
    moe = MoEConfig(dim=dim, moe_inter_dim=width, n_routed_experts=n_experts, n_activated_experts=6,
                    n_shared_experts=2)
    base = dict(vocab_size=32000, dim=dim, inter_dim=5632, n_dense_layers=1, n_heads=8, moe=moe, q_lora_rank=384,
                kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
    per_moe_layer = (n_experts + 2) * 3 * dim * width * 2
    fixed = (2 * 32000 * dim + 3 * dim * 5632) * 2
    n_moe = max(1, int((gb * 1e9 - fixed) / per_moe_layer) + 1)
    return ModelConfig(n_layers=1 + n_moe, **base)  # type: ignore[arg-type]


def write_checkpoint(path: Path, gb: float) -> int:
    cfg = checkpoint_config(gb)
    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_pretrained(model, path, max_shard_size="400MB")
    del model
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


CHILD = r"""
import json, sys, time
import torch, safetensors.torch
import deepseek_moe
from pathlib import Path

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
path, mode = sys.argv[1], sys.argv[2]
before = hwm()
t0 = time.perf_counter()
if mode == "ours, as stored":
    model = deepseek_moe.from_pretrained(path)
elif mode == "ours, to float32":
    model = deepseek_moe.from_pretrained(path, dtype=torch.float32)
else:
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(safetensors.torch.load_file(f))
    for t in state.values():  # touch every byte: load_file may hand out lazily mapped tensors
        t.view(torch.uint8).sum()
seconds = time.perf_counter() - t0
print(json.dumps({"growth": hwm() - before, "seconds": seconds}))
"""

MODES = ("ours, as stored", "ours, to float32", "safetensors.load_file")


def measure(path: Path, mode: str) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], check=True, capture_output=True,
                         text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.1, help="checkpoint size to write (default 1.1 GB)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds (default 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="load_memory_") as tmp:
        path = Path(tmp)
        t0 = time.perf_counter()
        size = write_checkpoint(path, args.gb)
        print(f"wrote {size / 1e9:.2f} GB ({len(list(path.glob('*.safetensors')))} shards) in "
              f"{time.perf_counter() - t0:.0f} s to {path}", flush=True)
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                runs[mode].append(measure(path, mode))
    print(f"\n{'load':<24} {'VmHWM growth':>14} {'/ file size':>12} {'seconds':>9}")
    result: dict[str, object] = {"benchmark": "load_memory", "file_bytes": size}
    for mode in MODES:
        growth = max(r["growth"] for r in runs[mode])
        seconds = min(r["seconds"] for r in runs[mode])
        print(f"{mode:<24} {growth / 2**20:>11.0f} MiB {growth / size:>11.3f}x {seconds:>9.2f}")
        result[mode] = {"growth_bytes": growth, "ratio": round(growth / size, 4), "seconds": round(seconds, 3)}
    print("(growth: worst of the rounds; seconds: best)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
