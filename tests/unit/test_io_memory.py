"""The loader's memory bound at small scale (benchmarks/load_memory.py measures it on >= 1 GB): in a fresh
process, the peak resident set (VmHWM, file-backed pages included) grows by at most 1.2x the safetensors bytes
when loading as stored. Reading through a memory map plus a copy would be ~2x; initialising the model and then
copying the weights in, ~2x or more."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.io import save_pretrained
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

CHILD = r"""
import json, sys
import deepseek_moe

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
before = hwm()
model = deepseek_moe.from_pretrained(sys.argv[1])
print(json.dumps({"growth": hwm() - before, "dtype": str(next(model.parameters()).dtype)}))
"""


def test_load_grows_peak_memory_by_at_most_1_2x_the_files(tmp_path: Path) -> None:
    moe = MoEConfig(dim=512, moe_inter_dim=512, n_routed_experts=16, n_activated_experts=2)
    cfg = ModelConfig(vocab_size=16384, dim=512, inter_dim=1024, n_layers=3, n_dense_layers=1, n_heads=4, moe=moe,
                      kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_pretrained(model, tmp_path, max_shard_size="40MB")
    del model
    size = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert size > 80e6
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dtype"] == "torch.bfloat16"
    assert result["growth"] <= 1.2 * size, f"VmHWM grew {result['growth'] / size:.3f}x the files ({size} bytes)"
