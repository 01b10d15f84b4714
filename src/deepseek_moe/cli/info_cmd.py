"""``deepseek-moe info CHECKPOINT|PRESET``: parameters (total, activated), FLOPs and KV-cache bytes per token,
and the architecture, of a preset or of a checkpoint's config.json (weights are never read)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deepseek_moe.cli.main import UsageError
from deepseek_moe.io import CheckpointError
from deepseek_moe.io.locate import checkpoint_dir

DEFAULT_CONTEXT = 4096
FLOPS_CONVENTION = ("forward only: 2 x activated weights (the embedding lookup excluded) + attention scores and "
                    "weighted values in the expanded form, 2 x n_layers x n_heads x (qk_head_dim + v_head_dim) "
                    "x context; training is about 3x")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, FLOPs and KV cache per token of a preset or checkpoint",
                       description=__doc__)
    p.add_argument("target", metavar="CHECKPOINT|PRESET",
                   help="a preset name (tiny, deepseek-v3, ...), a Hugging Face checkpoint directory or a train "
                   "run directory")
    p.add_argument("--context", type=int, metavar="N",
                   help=f"keys attended to, for the FLOPs with attention (default min({DEFAULT_CONTEXT}, "
                   "max_seq_len))")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def load_config(target: str) -> tuple[Any, str]:  # -> (ModelConfig, description of the source)
    """The ModelConfig ``target`` names: a preset, else a checkpoint directory's config.json."""
    from deepseek_moe.presets import PRESETS, get_preset

    if not Path(target).exists() and target.strip().lower().replace("_", "-") in PRESETS:
        return get_preset(target), f"preset {target}"
    if not Path(target).exists() and "/" not in target and not target.startswith("."):
        raise CheckpointError(f"{target!r} is neither a preset nor a checkpoint directory; valid presets: "
                              f"{', '.join(PRESETS)}")
    from deepseek_moe.io import read_config

    path = checkpoint_dir(target)
    try:
        _, cfg = read_config(path)  # any layout: V2/V3, DeepSeekMoE 16B, our own format
    except ValueError as e:  # the translation's and the dataclasses' rules: a bad file, not a bug
        raise CheckpointError(str(e)) from e
    return cfg, str(path / "config.json")


def model_info(cfg: Any, context: int | None = None) -> dict[str, Any]:  # cfg: ModelConfig
    """Everything ``info`` prints, as plain JSON-able values."""
    import torch

    from deepseek_moe.model.counting import count_parameters, flops_per_token, kv_cache_bytes_per_token

    if context is None:
        context = min(DEFAULT_CONTEXT, cfg.max_seq_len)
    if context < 0:
        raise UsageError(f"--context ({context}) must be >= 0")
    total, activated = count_parameters(cfg)
    _, activated_with_embedding = count_parameters(cfg, embedding_activated=True)
    moe = cfg.moe
    mha = cfg if cfg.attention == "mha" else cfg.replace(attention="mha")
    kv: dict[str, Any] = {}
    for name, shapes in (("mla", cfg if cfg.attention == "mla" else None), ("mha", mha)):
        kv[name] = None if shapes is None else {
            "bf16": kv_cache_bytes_per_token(shapes, torch.bfloat16),
            "fp32": kv_cache_bytes_per_token(shapes, torch.float32),
        }
    return {
        "architecture": {
            "attention": cfg.attention, "n_layers": cfg.n_layers, "n_dense_layers": cfg.n_dense_layers,
            "n_moe_layers": cfg.n_moe_layers, "dim": cfg.dim, "n_heads": cfg.n_heads,
            "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim, "q_lora_rank": cfg.q_lora_rank,
            "kv_lora_rank": cfg.kv_lora_rank if cfg.attention == "mla" else None,
            "inter_dim": cfg.inter_dim, "vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_seq_len,
            "tie_word_embeddings": cfg.tie_word_embeddings,
        },
        "experts": {
            "routed": moe.n_routed_experts, "shared": moe.n_shared_experts, "activated": moe.n_activated_experts,
            "moe_inter_dim": moe.moe_inter_dim, "groups": moe.n_expert_groups,
            "limited_groups": moe.n_limited_groups, "score_func": moe.score_func,
            "group_score_func": moe.group_score_func, "routing_bias": moe.use_routing_bias,
        },
        "parameters": {"total": total, "activated": activated,
                       "activated_with_embedding": activated_with_embedding},
        # 2 * activated is flops_per_token(cfg, 0); not calling it saves building a 671B meta model a fourth time.
        "flops_per_token": {"context": context, "without_attention": 2 * activated,
                            "with_attention": flops_per_token(cfg, context), "convention": FLOPS_CONVENTION},
        "kv_cache_bytes_per_token": kv,
    }


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _bytes(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_info(info: dict[str, Any], source: str) -> str:
    a, e, p, f, kv = (info[k] for k in ("architecture", "experts", "parameters", "flops_per_token",
                                         "kv_cache_bytes_per_token"))
    if a["attention"] == "mla":
        attn = f"MLA (kv_lora_rank {a['kv_lora_rank']}, q_lora_rank {a['q_lora_rank'] or 'none'})"
    else:
        attn = "MHA"
    heads = (f"{a['n_heads']} heads of qk {a['qk_nope_head_dim']}+{a['qk_rope_head_dim']} (nope+rope), "
             f"v {a['v_head_dim']}")
    groups = (f"{e['groups']} groups, top {e['limited_groups']} per token (M)" if e["groups"] > 1
              else "no groups")
    lines = [
        source,
        f"  layers        {a['n_layers']} ({a['n_dense_layers']} dense, {a['n_moe_layers']} MoE), dim {a['dim']}, "
        f"vocab {a['vocab_size']}, context {a['max_seq_len']}",
        f"  attention     {attn}, {heads}",
        f"  experts       {e['routed']} routed + {e['shared']} shared, {e['activated']} routed activated per token, "
        f"width {e['moe_inter_dim']}; {groups}; score {e['score_func']}"
        + (" + bias (aux-loss-free)" if e["routing_bias"] else ""),
        f"  parameters    {_count(p['total'])} total ({p['total']:,}), {_count(p['activated'])} activated per "
        f"token ({p['activated']:,}; {_count(p['activated_with_embedding'])} counting the embedding)",
        f"  FLOPs/token   {_count(f['without_attention'])} without attention, {_count(f['with_attention'])} at "
        f"context {f['context']}",
        f"                ({f['convention']})",
    ]
    mla = kv["mla"]
    mla_text = (f"MLA {_bytes(mla['bf16'])} bf16 / {_bytes(mla['fp32'])} fp32" if mla
                else "MLA n/a (this model uses MHA)")
    mha = kv["mha"]
    lines.append(f"  KV cache/tok  {mla_text}; MHA at the same head shapes {_bytes(mha['bf16'])} bf16 / "
                 f"{_bytes(mha['fp32'])} fp32" + (f" ({mha['bf16'] / mla['bf16']:.1f}x)" if mla else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from deepseek_moe.kernels import mla_decode, rms_norm
    from deepseek_moe.kernels.quant_matmul import kernel_report

    cfg, source = load_config(args.target)
    info = model_info(cfg, args.context)
    kernels = kernel_report()
    mla_kernel, norm_kernel = mla_decode.kernel_available(), rms_norm.kernel_available()
    if args.json:
        print(json.dumps({"source": source, **info,
                          "cpu_kernels": {**kernels, "mla_decode": mla_kernel, "rms_norm": norm_kernel}}))
    else:
        print(format_info(info, source))
        dot = f", {kernels['int8_dot']} dot products" if kernels["int8_dot"] else ""
        print(f"  CPU kernels   quantised matmul: {kernels['quant_matmul'] or 'none (dequantise + matmul)'}, "
              f"{kernels['activations']} activations{dot} (this CPU runs: {', '.join(kernels['supported']) or '-'}); "
              f"MLA decode: {'one C++ call' if mla_kernel else 'batched products (no compiled kernel)'}; "
              f"decode RMSNorm: {'one C++ call' if norm_kernel else 'torch'}")
    return 0
