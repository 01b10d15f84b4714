"""Training: ``run(TrainConfig(...))`` trains a DeepSeekMoE language model and writes a run directory;
``Trainer(cfg)`` is the same run in pieces (``setup``, ``step``, ``evaluate``, ``save``) for a loop of one's own."""

from deepseek_moe.train.config import TrainConfig
from deepseek_moe.train.errors import TrainError
from deepseek_moe.train.loop import RunResult, Trainer, run

__all__ = ["RunResult", "TrainConfig", "TrainError", "Trainer", "run"]
