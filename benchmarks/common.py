"""What every benchmark means by its model sizes, in one place.

``mid_size()`` is the 404M-parameter DeepSeek-V2-shaped model of issue 9's llama.cpp table (half V2-Lite's
widths): dim 1024, 8 heads, q-LoRA 384, kv-LoRA 256, one dense layer of 5632 then five MoE layers of 32 routed
experts of width 704, top-6 + 2 shared, vocabulary 4096; ~123M weights read per decoded token.
``v2_lite()`` is the published DeepSeek-V2-Lite shape (27 layers, dim 2048, 64 + 2 experts of 1408, top-6,
kv-LoRA 512, vocabulary 102400).
"""

from __future__ import annotations

import os
import subprocess

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.presets import deepseek_v2_lite


def mid_size() -> ModelConfig:
    dim = 1024
    return ModelConfig(
        vocab_size=4096, dim=dim, inter_dim=5632, n_layers=6, n_dense_layers=1, n_heads=8,
        q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        max_seq_len=4096, original_seq_len=4096,
        moe=MoEConfig(dim=dim, moe_inter_dim=704, n_routed_experts=32, n_activated_experts=6, n_shared_experts=2),
    )


def v2_lite() -> ModelConfig:
    return deepseek_v2_lite()


def uptime() -> str:
    """The load average, recorded beside every number (the machine is shared)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return " ".join(map(str, os.getloadavg()))
