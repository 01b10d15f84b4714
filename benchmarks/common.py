"""What every benchmark means by its model sizes, in one place.

``mid_size()`` is the 404M-parameter DeepSeek-V2-shaped model of issue 9's llama.cpp table (half V2-Lite's
widths): dim 1024, 8 heads, q-LoRA 384, kv-LoRA 256, one dense layer of 5632 then five MoE layers of 32 routed
experts of width 704, top-6 + 2 shared, vocabulary 4096; ~123M weights read per decoded token.
``v2_lite()`` is the published DeepSeek-V2-Lite shape (27 layers, dim 2048, 64 + 2 experts of 1408, top-6,
kv-LoRA 512, vocabulary 102400).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import torch

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


def validation_batches(run_dir: Path, tokenizer: object) -> list[torch.Tensor]:
    """The run's whole validation split as the training loop cuts it (same corpus split, sequence length)."""
    from deepseek_moe.train.corpus import load_corpus
    from deepseek_moe.train.data import PackedSequences, tokenize

    cfg = json.loads((run_dir / "config.json").read_text())
    data = cfg["data"]
    corpus = load_corpus(tuple(data["paths"]), text_field=data["text_field"], val_fraction=data["val_fraction"])
    tokens = tokenize(corpus.val, tokenizer)  # type: ignore[arg-type]
    seqs = PackedSequences(np.asarray(tokens), data["seq_len"], cfg.get("seed", 0))
    return seqs.fixed_batches(cfg["schedule"]["batch_size"])


def write_random_checkpoint(cfg: ModelConfig, path: str | os.PathLike[str], *, bits: int | None,
                            dtype: str = "bfloat16", seed: int = 0, shard_bytes: int = 2 * 10**9) -> int:
    """Write a checkpoint of ``cfg`` with random weights straight to disk in shards of ~``shard_bytes`` (never
    the whole model in memory): quantised (bits 8 / 4, the default scope of deepseek_moe.quant) with random
    codes and scales giving weights of std ~0.02, or full precision (bits None) in ``dtype``. Returns the
    bytes written."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from deepseek_moe.io.hf import config_to_hf
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
    from deepseek_moe.quant import QuantConfig, prepare_model
    from deepseek_moe.quant.format import hf_key_of

    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(cfg)
    qcfg = QuantConfig(bits=bits) if bits else None  # type: ignore[arg-type]
    if qcfg is not None:
        prepare_model(model, qcfg, dtype=torch_dtype)
    gen = torch.Generator().manual_seed(seed)

    def random(name: str, dt: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if dt == torch.int8:
            return torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
        if dt == torch.uint8:
            return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        if name.endswith("_scale"):  # codes have std ~73 (int8) / ~4.6 (int4: 0..15 - 8)
            return torch.full(shape, 0.02 / (73.0 if dt == torch.float32 else 4.6), dtype=dt)
        if "norm" in name:
            return torch.ones(shape, dtype=dt)
        return (torch.randn(shape, generator=gen) * 0.02).to(dt)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}  # the one shard in memory
    size = total = 0
    names: list[str] = []

    def flush() -> None:
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        names.append(name)
        shard.clear()

    weight_map: dict[str, str] = {}
    for name, t in model.state_dict().items():
        mapped = hf_key_of(name)
        if mapped is None or (cfg.tie_word_embeddings and name == "head.weight"):
            continue
        key, stacked = mapped
        keep_dtype = t.dtype in (torch.int8, torch.uint8) or name.endswith("_scale") or ".ffn.gate." in name
        dt = t.dtype if keep_dtype else torch_dtype
        parts = ([(key.replace("{e}", str(e)), tuple(t.shape[1:])) for e in range(t.shape[0])] if stacked
                 else [(key, tuple(t.shape))])
        for k, shape in parts:
            tensor = random(k, dt, shape)
            shard[k] = tensor
            weight_map[k] = f"model-{len(names) + 1:05d}.safetensors"
            size += tensor.numel() * tensor.element_size()
            total += tensor.numel() * tensor.element_size()
            if size >= shard_bytes:
                flush()
                size = 0
    if shard:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    hf = config_to_hf(cfg, dtype=dtype)
    if qcfg is not None:
        hf["quantization_config"] = qcfg.to_hf()
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return total


def read_bandwidth_gbs(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """This machine's memory read bandwidth: the best of ``repeats`` fp32 sums over ``n_bytes``."""
    import time

    import torch

    x = torch.ones(n_bytes // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best / 1e9


def vm_hwm_bytes() -> int:
    """Peak resident set (VmHWM, file pages included) of this process."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def weights_read_per_token(model: object, batch: int = 1) -> int:
    """Bytes of weights one decode step reads: every matrix, the routed experts the batch selects (expected
    distinct experts for uniform routing, K/E of them at batch 1), one embedding row per token."""
    from torch import nn

    from deepseek_moe.moe.experts import RoutedExperts
    from deepseek_moe.quant import QuantLinear, QuantRoutedExperts

    assert isinstance(model, nn.Module)
    cfg = model.config  # type: ignore[attr-defined]
    E, K = cfg.moe.n_routed_experts, cfg.moe.n_activated_experts
    selected = E * (1 - (1 - K / E) ** batch)
    total = 0.0
    counted: set[int] = set()
    for mod in model.modules():
        tensors = [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]
        if isinstance(mod, QuantRoutedExperts | RoutedExperts):
            total += sum(t.numel() * t.element_size() for t in tensors) * selected / E
        elif isinstance(mod, QuantLinear | nn.Linear):  # (a tied head reads the whole embedding matrix)
            total += sum(t.numel() * t.element_size() for t in tensors if id(t) not in counted)
        else:
            continue
        counted.update(id(t) for t in tensors)
    embed = model.embed.weight  # type: ignore[attr-defined]
    if id(embed) not in counted:
        counted.add(id(embed))
        total += embed[0].numel() * embed.element_size() * batch
    total += sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in counted)  # norms, routers
    return int(total)
