"""Training: ``run(TrainConfig(...))`` trains a DeepSeekMoE language model and writes a run directory."""

from deepseek_moe.train.config import TrainConfig
from deepseek_moe.train.errors import TrainError
from deepseek_moe.train.loop import RunResult, run

__all__ = ["RunResult", "TrainConfig", "TrainError", "run"]
