"""How much smaller is MLA's KV cache, and what does decoding from it cost on CPU?

1. KV-cache bytes per token at the DeepSeek-V2 preset's shapes, measured by running one token through one
   attention layer built on the meta device and reading its cache: MLA caches the latent and the shared RoPE
   key (512 + 64 = 576 elements per layer); the paper's MHA baseline (d_h = 128) caches 2 * 128 * 128 = 32768;
   MHA with MLA's own head shapes (q/k 192, v 128) would cache 40960.
2. Decode tokens/s on CPU for ``tiny`` and a mid-size model: MLA with the absorbed latent cache, MLA re-expanding
   the latent each step (naive), and MHA with a full K/V cache, run interleaved (each repeat runs all three, so
   drift in machine load hits all alike); the median over repeats is reported.

Prints a table and one JSON line. ``python benchmarks/attention.py --help`` for sizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.infer.generate import generate
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.model.counting import count_parameters, kv_cache_elements_per_token
from deepseek_moe.presets import deepseek_v2, tiny

BF16_BYTES = 2


def mid_size() -> ModelConfig:
    """V2-Lite's attention shapes (16 heads, latent 512, RoPE 64, heads 128/64/128) in a 6-layer model.

    Its FFNs are dense, so attention is a large share of a decode step; the MoE layer's cost is the same for
    every attention variant and is measured by benchmarks of its own."""
    dim = 1024
    return ModelConfig(
        vocab_size=8192, dim=dim, inter_dim=2816, n_layers=6, n_dense_layers=6, n_heads=16,
        q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        max_seq_len=4096,
        moe=MoEConfig(dim=dim, moe_inter_dim=352, n_routed_experts=16, n_activated_experts=4, n_shared_experts=1),
    )


def cache_sizes() -> list[dict[str, Any]]:
    v2 = deepseek_v2()
    variants = {
        "MLA (latent + RoPE key)": v2,
        "MHA, paper baseline d_h=128": v2.replace(attention="mha", qk_nope_head_dim=64, qk_rope_head_dim=64),
        "MHA, MLA head shapes": v2.replace(attention="mha"),
    }
    rows = []
    for name, cfg in variants.items():
        elements = kv_cache_elements_per_token(cfg)
        rows.append({"variant": name, "elements_per_layer": elements // cfg.n_layers,
                     "bf16_bytes_per_token": elements * BF16_BYTES,
                     "mib_per_128k_tokens": elements * BF16_BYTES * 128 * 1024 / 2**20})
    return rows


def decode_speed(name: str, cfg: ModelConfig, *, batch: int, prompt_len: int, new_tokens: int,
                 repeats: int) -> list[dict[str, Any]]:
    variants = {
        "MLA absorb (latent cache)": cfg.replace(attn_impl="absorb"),
        "MLA naive (latent cache, re-expand)": cfg.replace(attn_impl="naive"),
        "MHA (full K/V cache)": cfg.replace(attention="mha"),
    }
    models = {}
    for label, variant_cfg in variants.items():
        torch.manual_seed(0)
        models[label] = DeepSeekMoEForCausalLM(variant_cfg).eval()
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    speeds: dict[str, list[float]] = {label: [] for label in variants}
    for model in models.values():  # warm-up: first calls pay for allocation and kernel selection
        generate(model, prompts, max_new_tokens=2)
    for _ in range(repeats):
        for label, model in models.items():
            speeds[label].append(generate(model, prompts, max_new_tokens=new_tokens).decode_tokens_per_s)
    rows = []
    for label, model in models.items():
        cache = model.new_cache()
        with torch.inference_mode():
            model(torch.tensor(prompts[:1]), cache=cache)
        rows.append({"model": name, "variant": label, "params": count_parameters(model.config)[0],
                     "decode_tokens_per_s": statistics.median(speeds[label]),
                     "cache_bytes_per_token_fp32": cache.bytes_per_token()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    # One thread by default: on a shared 2-core machine, two OpenMP threads spin against other processes and
    # small decode matmuls run several times slower than on one.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)

    sizes = cache_sizes()
    print("KV cache per token at DeepSeek-V2 shapes (60 layers, 128 heads), bf16")
    print(f"{'variant':<32}{'elements/layer':>16}{'KiB/token':>12}{'GiB/128K ctx':>14}")
    for r in sizes:
        print(f"{r['variant']:<32}{r['elements_per_layer']:>16}{r['bf16_bytes_per_token'] / 1024:>12.1f}"
              f"{r['mib_per_128k_tokens'] / 1024:>14.1f}")

    speed = []
    for name, cfg in (("tiny", tiny()), ("mid", mid_size())):
        speed += decode_speed(name, cfg, batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                              repeats=args.repeats)
    print(f"\nCPU decode, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.repeats} interleaved repeats, threads: {torch.get_num_threads()}")
    print(f"{'model':<6}{'params':>8}  {'variant':<38}{'tokens/s':>10}{'cache B/token':>15}")
    for r in speed:
        print(f"{r['model']:<6}{r['params'] / 1e6:>7.1f}M  {r['variant']:<38}{r['decode_tokens_per_s']:>10.1f}"
              f"{r['cache_bytes_per_token_fp32']:>15.0f}")
    print(json.dumps({"benchmark": "attention", "kv_cache": sizes, "decode": speed, "config": vars(args)}))


if __name__ == "__main__":
    main()
