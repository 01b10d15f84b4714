"""What the app serves: the scheduler over a loaded model, with its tokenizer, chat template and grammar compiler."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

from deepseek_moe.serve.scheduler import Scheduler
from deepseek_moe.serve.structured import GrammarCompiler
from deepseek_moe.serve.text import ChatTemplate, TokenBytes


@dataclass
class ServedModel:
    """What the app serves: the scheduler over a loaded model, its tokenizer and chat template."""

    name: str
    scheduler: Scheduler
    tokenizer: Any
    chat_template: ChatTemplate
    stop_token_ids: frozenset[int]
    created: int = field(default_factory=lambda: int(time.time()))
    grammars: GrammarCompiler = field(init=False)

    def __post_init__(self) -> None:
        eos = min(self.stop_token_ids) if self.stop_token_ids else None
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, eos)

    @property
    def max_seq_len(self) -> int:
        return self.scheduler.max_tokens_capacity()

    @property
    def adapters(self) -> list[str]:
        """The LoRA adapters served beside the base model, each selected by its name in ``model``."""
        return self.scheduler.adapter_names

    @property
    def vocab_size(self) -> int:
        return self.scheduler.model.config.vocab_size

    @functools.cached_property
    def token_bytes(self) -> TokenBytes:
        """Each token's own bytes, for logprobs (built on first use: it reads the whole vocabulary)."""
        return TokenBytes(self.tokenizer)
