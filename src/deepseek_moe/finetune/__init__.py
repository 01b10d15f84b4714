"""Fine-tuning a checkpoint: ``run(FinetuneConfig(base=..., data=(...,)))`` (``deepseek-moe finetune``). Data formats
(chat / prompt-completion / text), loss masks and packing live in data.py and packing.py; the Trainer does the loop
(run.py)."""

from deepseek_moe.finetune.config import FinetuneConfig
from deepseek_moe.finetune.run import FinetuneTrainer, read_run, run

__all__ = ["FinetuneConfig", "FinetuneTrainer", "read_run", "run"]
