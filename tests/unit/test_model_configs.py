"""Tiny model configs shared by the model, attention and generation tests."""

from deepseek_moe.config import ModelConfig, MoEConfig

DIM = 32


def small_config(**overrides: object) -> ModelConfig:
    """Two layers, the second MoE; MLA with query compression and YaRN on, so every path is exercised."""
    base: dict[str, object] = dict(
        vocab_size=64, dim=DIM, inter_dim=64, n_layers=2, n_dense_layers=1, n_heads=4, max_seq_len=48,
        q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        rope_factor=4.0, original_seq_len=16, mscale=0.707, mscale_all_dim=0.707,
        moe=MoEConfig(dim=DIM, moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2, n_shared_experts=1,
                      n_expert_groups=2, n_limited_groups=1),
    )
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]
