"""deepseek_moe: DeepSeekMoE in PyTorch."""

from deepseek_moe.config import ModelConfig, MoEConfig

__all__ = ["MoEConfig", "ModelConfig"]
