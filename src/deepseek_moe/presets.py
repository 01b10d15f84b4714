"""Published model shapes as plain functions returning a ModelConfig, and ``get_preset(name)``.

Shapes are those of the released Hugging Face configs (``config.json`` of deepseek-ai/deepseek-moe-16b-base,
DeepSeek-V2-Lite, DeepSeek-V2, DeepSeek-V3) and, for DeepSeekMoE 2B, the paper's Appendix A (the 2B model was
not released; its expert width is chosen so the totals match the paper's 2.0B / 0.3B). Override any field with
``.replace(...)``, e.g. ``tiny().replace(vocab_size=len(tokenizer))``.

DeepSeekMoE 2B/16B use LLaMA-style multi-head attention: ``attention="mha"`` with the whole 128-wide head
rotary (``qk_nope_head_dim=0``) and RoPE on split halves (``rope_interleave=False``).
"""

from __future__ import annotations

from collections.abc import Callable

from deepseek_moe.config import ModelConfig, MoEConfig


def _with_v2_yarn(cfg: ModelConfig, *, mscale: float) -> ModelConfig:
    """YaRN as the DeepSeek-V2 family ships it: the 4K pre-training context extended 40x (128K used)."""
    return cfg.replace(rope_factor=40.0, original_seq_len=4096, beta_fast=32.0, beta_slow=1.0, max_seq_len=163840,
                       mscale=mscale, mscale_all_dim=mscale)


def tiny() -> ModelConfig:
    """A CPU demo (8.2M parameters, 3.6M activated) with every DeepSeek-V2 feature on: MLA, a first dense
    layer, fine-grained routed experts in groups with device-limited routing, and a shared expert."""
    dim = 256
    return ModelConfig(
        vocab_size=4096, dim=dim, inter_dim=768, n_layers=4, n_dense_layers=1, n_heads=4,
        q_lora_rank=0, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_seq_len=512, original_seq_len=512,
        moe=MoEConfig(dim=dim, moe_inter_dim=128, n_routed_experts=16, n_activated_experts=4, n_shared_experts=1,
                      n_expert_groups=4, n_limited_groups=2, expert_loss_alpha=0.01),
    )


def deepseek_moe_2b() -> ModelConfig:
    """DeepSeekMoE 2B (paper §4.1, Appendix A): 9 MoE layers, 1 shared + 63 routed experts, 1 + 7 active, each
    a quarter of a standard FFN (SwiGLU width 8/3 * dim rounded up to a multiple of 128: 3456); 8K BPE vocabulary.
    Attention and FFN widths are the paper's; it gives no exact figures beyond 2.0B total, 0.3B activated."""
    dim = 1280
    return ModelConfig(
        vocab_size=8192, dim=dim, inter_dim=3456, n_layers=9, n_dense_layers=0, n_heads=10,
        attention="mha", kv_lora_rank=0, qk_nope_head_dim=0, qk_rope_head_dim=128, v_head_dim=128,
        rope_interleave=False, max_seq_len=2048, original_seq_len=2048,
        moe=MoEConfig(dim=dim, moe_inter_dim=864, n_routed_experts=63, n_activated_experts=7, n_shared_experts=1,
                      n_expert_groups=1, n_limited_groups=1),
    )


def deepseek_moe_16b() -> ModelConfig:
    """DeepSeekMoE 16B (deepseek-moe-16b-base): 16.4B total, 2.8B activated."""
    dim = 2048
    return ModelConfig(
        vocab_size=102400, dim=dim, inter_dim=10944, n_layers=28, n_dense_layers=1, n_heads=16,
        attention="mha", kv_lora_rank=0, qk_nope_head_dim=0, qk_rope_head_dim=128, v_head_dim=128,
        rope_interleave=False, max_seq_len=4096, bos_token_id=100000, eos_token_id=100001,
        moe=MoEConfig(dim=dim, moe_inter_dim=1408, n_routed_experts=64, n_activated_experts=6, n_shared_experts=2,
                      n_expert_groups=1, n_limited_groups=1),
    )


def deepseek_v2_lite() -> ModelConfig:
    """DeepSeek-V2-Lite: 15.7B total, 2.4B activated; MLA without query compression, no device limit."""
    dim = 2048
    return _with_v2_yarn(ModelConfig(
        vocab_size=102400, dim=dim, inter_dim=10944, n_layers=27, n_dense_layers=1, n_heads=16,
        q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        bos_token_id=100000, eos_token_id=100001,
        moe=MoEConfig(dim=dim, moe_inter_dim=1408, n_routed_experts=64, n_activated_experts=6, n_shared_experts=2,
                      n_expert_groups=1, n_limited_groups=1),
    ), mscale=0.707)


def deepseek_v2() -> ModelConfig:
    """DeepSeek-V2: 236B total, 21B activated; experts on 8 devices, at most 3 per token (§2.2.2), the three
    balance losses of §2.2.3 (α1 0.003, α2 0.05, α3 0.02) and device-level token dropping at capacity 1.0."""
    dim = 5120
    return _with_v2_yarn(ModelConfig(
        vocab_size=102400, dim=dim, inter_dim=12288, n_layers=60, n_dense_layers=1, n_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        bos_token_id=100000, eos_token_id=100001,
        moe=MoEConfig(dim=dim, moe_inter_dim=1536, n_routed_experts=160, n_activated_experts=6, n_shared_experts=2,
                      n_expert_groups=8, n_limited_groups=3, route_scale=16.0,
                      expert_loss_alpha=0.003, device_loss_alpha=0.05, comm_loss_alpha=0.02, capacity_factor=1.0),
    ), mscale=0.707)


def deepseek_v3() -> ModelConfig:
    """DeepSeek-V3 (without the multi-token-prediction module): 671B total, 37B activated; sigmoid affinities,
    groups ranked by their top-2 sum, auxiliary-loss-free balancing with a tiny sequence-wise loss (α 1e-4)."""
    dim = 7168
    return _with_v2_yarn(ModelConfig(
        vocab_size=129280, dim=dim, inter_dim=18432, n_layers=61, n_dense_layers=3, n_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        bos_token_id=0, eos_token_id=1,
        moe=MoEConfig(dim=dim, moe_inter_dim=2048, n_routed_experts=256, n_activated_experts=8, n_shared_experts=1,
                      n_expert_groups=8, n_limited_groups=4, group_score_func="top2_sum", score_func="sigmoid",
                      norm_topk_prob=True, route_scale=2.5, use_routing_bias=True, bias_update_speed=0.001,
                      seq_loss_alpha=1e-4, expert_loss_alpha=0.0),
    ), mscale=1.0)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "deepseek-moe-2b": deepseek_moe_2b,
    "deepseek-moe-16b": deepseek_moe_16b,
    "deepseek-v2-lite": deepseek_v2_lite,
    "deepseek-v2": deepseek_v2,
    "deepseek-v3": deepseek_v3,
}


def get_preset(name: str) -> ModelConfig:
    """The preset called ``name`` (underscores accepted for hyphens)."""
    key = name.strip().lower().replace("_", "-")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid names: {', '.join(PRESETS)}")
    return PRESETS[key]()


__all__ = ["PRESETS", "deepseek_moe_16b", "deepseek_moe_2b", "deepseek_v2", "deepseek_v2_lite", "deepseek_v3",
           "get_preset", "tiny"]
