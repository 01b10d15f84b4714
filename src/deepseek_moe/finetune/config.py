"""FinetuneConfig: what to fine-tune, on what data, how (frozen, validated); the Trainer's settings inside."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from deepseek_moe.adapters.config import LoRAConfig
from deepseek_moe.train.config import DataConfig, EvalConfig, OptimConfig, RoutingConfig, TrainConfig


def _default_train() -> TrainConfig:
    return TrainConfig(optim=OptimConfig(lr=2e-4, weight_decay=0.0), eval=EvalConfig(sample_tokens=0))


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """``base``: a checkpoint directory or train run directory (anything ``from_pretrained`` reads, full
    precision). ``data`` / ``val_data``: .jsonl files, text files or folders (finetune/data.py); without
    ``val_data`` every round(1 / val_fraction)-th record is held out. ``tokenizer``: a tokenizer.json to use
    when BASE has none (BASE's own is used otherwise; its tokenizer_config.json gives the chat template).
    ``method``: "lora" (adapters only, per ``lora``) or "full". ``quantize``: "int8" / "int4" holds BASE frozen
    in our quantised format (quant/) under float adapters, LoRA only (a BASE saved quantised is held so without
    it); "bf16" holds its matrices in bf16 under fp32 activations and adapters (adapters/frozen_base.py). The routers (weights and routing bias) stay as
    BASE has them unless ``train_router``. ``mtp``: BASE's multi-token-prediction modules (if it has any) are loaded
    and their loss, weighted by ``train.schedule.mtp_lambda``, trains them (full) and the adapted model (both
    methods; LoRA leaves the modules frozen), so they still draft for the fine-tuned model; False loads BASE
    without them. ``expert_activations``: what LoRA on quantised routed experts keeps its gate/up
    pre-activations in for the backward ("bfloat16": half that memory, gradients at bf16 rounding;
    adapters/quant_experts.py). ``train``: the Trainer's schedule, optimizer, evaluation, checkpoint,
    seed, device and dtype settings (its model, data and routing sections are set from the fields here).
    """

    base: str
    data: tuple[str, ...]
    out: str | None = None
    val_data: tuple[str, ...] = ()
    val_fraction: float = 0.05
    tokenizer: str | None = None
    method: Literal["lora", "full"] = "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    loss_on: Literal["completion", "all"] = "completion"
    seq_len: int = 512
    strict: bool = False
    train_router: bool = False
    quantize: Literal["int8", "int4", "bf16"] | None = None
    mtp: bool = True
    expert_activations: Literal["float32", "bfloat16"] = "float32"
    train: TrainConfig = field(default_factory=_default_train)

    def __post_init__(self) -> None:
        if not self.base:
            raise ValueError("base must name a checkpoint directory")
        if isinstance(self.data, str) or not self.data:
            raise ValueError(f"data ({self.data!r}) must be a tuple of one or more paths")
        if isinstance(self.val_data, str):
            raise ValueError(f"val_data ({self.val_data!r}) must be a tuple of paths")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction ({self.val_fraction}) must be in (0, 1)")
        if self.method not in ("lora", "full"):
            raise ValueError(f"method ({self.method!r}) must be 'lora' or 'full'")
        if self.quantize not in (None, "int8", "int4", "bf16"):
            raise ValueError(f"quantize ({self.quantize!r}) must be None, 'int8', 'int4' or 'bf16'")
        if self.quantize is not None and self.method != "lora":
            raise ValueError(f"quantize ({self.quantize!r}) freezes BASE in {self.quantize}: it takes method 'lora', "
                             f"not {self.method!r}")
        if self.loss_on not in ("completion", "all"):
            raise ValueError(f"loss_on ({self.loss_on!r}) must be 'completion' or 'all'")
        if self.seq_len < 2:
            raise ValueError(f"seq_len ({self.seq_len}) must be >= 2")
        if not isinstance(self.mtp, bool):
            raise ValueError(f"mtp ({self.mtp!r}) must be true or false")
        if self.expert_activations not in ("float32", "bfloat16"):
            raise ValueError(f"expert_activations ({self.expert_activations!r}) must be 'float32' or 'bfloat16'")
        if self.train.ep:
            raise ValueError("train.ep: fine-tuning runs on one process")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        """The inverse of :meth:`to_dict` (JSON's lists back to tuples); unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown fine-tune config field(s): {', '.join(unknown)}")
        fields = dict(data)
        for key in ("data", "val_data"):
            if key in fields:
                fields[key] = tuple(fields[key])
        if "lora" in fields:
            lora = dict(fields["lora"])
            lora["targets"] = tuple(lora.get("targets", ()))
            fields["lora"] = LoRAConfig(**lora)
        if "train" in fields:
            fields["train"] = TrainConfig.from_dict(fields["train"])
        return cls(**fields)

    def replace(self, **changes: object) -> FinetuneConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def train_config(self) -> TrainConfig:
        """The Trainer's config: ``train`` with this run's out, data paths and seq_len, and no routing stages
        (no uniform warm-up: BASE's routers are trained already)."""
        return self.train.replace(
            out=self.out, data=DataConfig(paths=self.data, val_paths=self.val_data, seq_len=self.seq_len,
                                          val_fraction=self.val_fraction),
            routing=RoutingConfig(uniform_steps=0))
