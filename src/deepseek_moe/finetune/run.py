"""``run(FinetuneConfig)``: fine-tune a checkpoint with the Trainer (its run directory, metrics, plots and exact
resume). The data are tokenised a record at a time with BASE's tokenizer and packed into RUN/data/*.npy; a LoRA
run writes RUN/adapter/ (PEFT's format), a full run RUN/model/ in BASE's layout with BASE's tokenizer files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from deepseek_moe.adapters import (
    apply_lora,
    mark_trainable,
    narrow_frozen_embedding,
    narrow_frozen_matrices,
    set_saved_activations,
)
from deepseek_moe.adapters.peft import save_adapter
from deepseek_moe.adapters.pretrained import TOKENIZER_FILES
from deepseek_moe.config import ModelConfig
from deepseek_moe.finetune.config import FinetuneConfig
from deepseek_moe.finetune.data import (
    ChatRenderer,
    DataError,
    Example,
    Record,
    Tokenise,
    examples,
    read_records,
)
from deepseek_moe.finetune.packing import PackedRows, n_predictions, pack, packed_forward, write_rows
from deepseek_moe.io.load import load_pretrained, read_config
from deepseek_moe.io.locate import checkpoint_dir
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.quant import quant_config_of
from deepseek_moe.serve.text import stop_token_ids
from deepseek_moe.train.data import unigram_entropy
from deepseek_moe.train.errors import TrainError
from deepseek_moe.train.loop import RunResult, Trainer

CONFIG_FILE = "finetune.json"


@dataclass
class _Source:
    source: str

    def describe(self) -> dict[str, Any]:
        return {"source": self.source}


@dataclass
class FinetuneData:
    """What the Trainer reads of its data (train/build.py's TrainData), for packed fine-tuning rows."""

    corpus: _Source
    tokenizer: Tokenizer
    eos: int | None
    train: PackedRows
    val: PackedRows
    n_train_tokens: int
    n_val_tokens: int
    unigram_entropy: float = float("nan")

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    @property
    def eos_id(self) -> int:
        return 0 if self.eos is None else self.eos

    def describe(self) -> dict[str, Any]:
        return {"corpus": {"source": self.corpus.source, "train_tokens": self.n_train_tokens,
                           "val_tokens": self.n_val_tokens}}


class FinetuneTrainer(Trainer):
    def __init__(self, cfg: FinetuneConfig, *, resume: bool = False, force: bool = False,
                 progress: bool = True) -> None:
        super().__init__(cfg.train_config(), resume=resume, force=force, progress=progress)
        self.ft = cfg
        self.base = checkpoint_dir(cfg.base)
        self.update_bias = cfg.train_router
        self.model_name = f"{cfg.method} fine-tune of {self.base}"

    def tokenizer(self) -> tuple[Tokenizer, Path]:
        path = Path(self.ft.tokenizer) if self.ft.tokenizer else self.base / "tokenizer.json"
        if not path.is_file():
            raise TrainError(f"{self.base} has no tokenizer.json: a fine-tune keeps BASE's tokenizer; give one with "
                             "--tokenizer PATH" if not self.ft.tokenizer else f"--tokenizer {path}: no such file")
        return Tokenizer.from_file(str(path)), path.parent

    def load_data(self) -> FinetuneData:
        if self.strategy.is_main:  # what --resume RUN reads back (the run directory is prepared by now)
            (self.run_dir / CONFIG_FILE).write_text(json.dumps(self.ft.to_dict(), indent=2) + "\n")
        tok, tok_dir = self.tokenizer()
        raw, _ = read_config(self.base)
        eos = raw.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        eos = eos if isinstance(eos, int) else next(iter(stop_token_ids(None, tok, tok.get_vocab_size())), None)
        chat_dir = tok_dir if (tok_dir / "tokenizer_config.json").is_file() else self.base
        # The default template ends a reply with the eos token: the one of this tokenizer, which may be --tokenizer's
        eos_token = "" if eos is None else (tok.id_to_token(eos) or "")
        tokenise = Tokenise(tok, eos, chat=_chat(chat_dir, eos_token), loss_on=self.ft.loss_on)
        strict, report = self.ft.strict, self.log
        every = max(2, round(1 / self.ft.val_fraction))
        held: list[Example] = []
        train_records = read_records(self.ft.data, strict=strict, report=report)
        if not self.ft.val_data:
            train_records = _hold_out(train_records, every, held, tokenise, strict, report)
        rows_dir = self.run_dir / "data"
        try:
            train = write_rows(pack(examples(train_records, tokenise, strict=strict, report=report),
                                    self.ft.seq_len), rows_dir / "train.npy", self.ft.seq_len)
            val_examples: Any = (examples(read_records(self.ft.val_data, strict=strict, report=report), tokenise,
                                          strict=strict, report=report) if self.ft.val_data else iter(held))
            val = write_rows(pack(val_examples, self.ft.seq_len), rows_dir / "val.npy", self.ft.seq_len)
        except DataError as e:
            raise TrainError(str(e)) from e
        if len(val) == 0:
            raise TrainError("no validation example: give --val-data or more records (every "
                             f"{every}th is held out)")
        return FinetuneData(_Source(", ".join(self.ft.data)), tok, eos, PackedRows(train, self.ft.seq_len,
                            self.cfg.seed), PackedRows(val, self.ft.seq_len, self.cfg.seed),
                            _tokens(train), _tokens(val), _unigram_entropy(val, tok.get_vocab_size()))

    def model_config(self) -> ModelConfig:
        return read_config(self.base)[1]

    def build_model(self, model_cfg: ModelConfig) -> DeepSeekMoEForCausalLM:
        from deepseek_moe.model.block import set_activation_checkpointing

        if self.data.vocab_size > model_cfg.vocab_size:
            raise TrainError(f"the tokenizer has {self.data.vocab_size} tokens, more than BASE's vocab_size "
                             f"({model_cfg.vocab_size})")
        torch.manual_seed(self.cfg.seed)  # the adapters' initial A
        # quantize: streamed into codes layer by layer, so the float BASE never sits in memory whole
        bf16 = self.ft.quantize == "bf16"
        model = load_pretrained(self.base, dtype=torch.float32, quantize=None if bf16 else self.ft.quantize,
                                mtp=self.ft.mtp)
        if self.ft.method == "full" and quant_config_of(model) is not None:
            raise TrainError(f"{self.base} is a quantised checkpoint: its codes do not train; fine-tune it with "
                             "LoRA, or fully from the unquantised checkpoint")
        model.tokenizer = self.data.tokenizer
        if self.ft.method == "lora":
            try:
                apply_lora(model, self.ft.lora)
            except ValueError as e:  # a target matching nothing, a tied head: the person's to fix
                raise TrainError(str(e)) from e
            mark_trainable(model, train_router=self.ft.train_router)
            set_saved_activations(model, self.ft.expert_activations)
            if self.ft.quantize in ("int8", "int4"):  # a base held in codes: its frozen embedding table too
                narrow_frozen_embedding(model, torch.int8)
            if bf16:
                narrow_frozen_matrices(model, torch.bfloat16)
        else:
            for name, p in model.named_parameters():
                p.requires_grad_(self.ft.train_router or ".ffn.gate." not in name)
        set_activation_checkpointing(model, self.cfg.activation_checkpointing)
        return model.to(self.device).train()

    def forward(self, model: Any, batch: torch.Tensor) -> tuple[Any, int]:
        return packed_forward(model, batch), n_predictions(batch)

    def write_model(self) -> str:
        if self.ft.method == "lora":
            save_adapter(self.model, self.run_dir / "adapter", self.ft.lora, base_model=str(self.base))
            return "peft_adapter"
        written = super().write_model()
        for name in TOKENIZER_FILES:
            if (self.base / name).is_file() and not (self.run_dir / "model" / name).exists():
                shutil.copyfile(self.base / name, self.run_dir / "model" / name)
        return written


def _chat(path: Path, eos_token: str) -> ChatRenderer | None:
    try:
        return ChatRenderer.for_checkpoint(path, eos_token)
    except ImportError:  # jinja2 (the serve extra) missing: chat records are refused by name when met
        return None


def _tokens(rows: np.ndarray) -> int:
    return int((np.asarray(rows[:, 2]) > 0).sum()) if len(rows) else 0


def _unigram_entropy(rows: np.ndarray, vocab_size: int) -> float:
    """Of the validation tokens that carry a loss: the loss of the best context-free model of them."""
    labels = np.asarray(rows[:, 1]).reshape(-1)
    return unigram_entropy(labels[labels >= 0], vocab_size)


def _hold_out(records: Iterator[Record], every: int, held: list[Example], tokenise: Tokenise, strict: bool,
              report: Any) -> Iterator[Record]:
    """The records for training; every ``every``-th (from the first) is tokenised into ``held`` instead."""
    for i, record in enumerate(records):
        if i % every == 0:
            held.extend(examples(iter([record]), tokenise, strict=strict, report=report))
        else:
            yield record


def run(cfg: FinetuneConfig, *, resume: bool = False, force: bool = False, progress: bool = True) -> RunResult:
    """Fine-tune per ``cfg`` into ``cfg.out``; with ``resume``, continue that run from its latest checkpoint."""
    return FinetuneTrainer(cfg, resume=resume, force=force, progress=progress).fit()


def read_run(run_dir: str | Path) -> FinetuneConfig:
    """The FinetuneConfig a fine-tune's run directory was started with (for resuming it)."""
    file = Path(run_dir) / CONFIG_FILE
    if not file.is_file():
        raise TrainError(f"{run_dir}: no {CONFIG_FILE}; is it a fine-tune's run directory?")
    try:
        return FinetuneConfig.from_dict(json.loads(file.read_text()))
    except (ValueError, TypeError) as e:
        raise TrainError(f"{file}: not a valid fine-tune config: {e}") from e
