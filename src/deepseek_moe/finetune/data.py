"""Fine-tuning data: records read one at a time and tokenised into (ids, loss mask) examples.

Formats: ``.jsonl`` lines of ``{"messages": [{"role", "content"}, ...]}`` (OpenAI chat, rendered with the base's
chat template), ``{"prompt", "completion"}`` or ``{"text"}``; any other file is one text example, and a folder is
its files (sorted). Loss on the assistant / completion tokens only by default (``loss_on="all"``: every token).
A bad line is reported as ``file:line: why`` and skipped, or refused with ``strict``; never mis-tokenised.

Chat: for the i-th assistant message, the template renders the conversation before it with the generation prompt
(what generation would be given) and the conversation up to and including it; the trained span is the text the
second adds to the first (the reply and the template's end-of-turn text, so the model learns to stop). Each span
is tokenised on its own, as a prompt and the reply generated after it are.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

LossOn = Literal["completion", "all"]
TEXT_SUFFIXES_SKIPPED = (".npy", ".safetensors", ".bin", ".pt", ".gz", ".zip", ".png", ".jpg")


class DataError(ValueError):
    """A record that cannot be used, named by file and line."""


@dataclass(frozen=True)
class Example:
    """ids (N,) int64 and loss_mask (N,) bool: which tokens' predictions count."""

    ids: np.ndarray
    loss_mask: np.ndarray


@dataclass(frozen=True)
class Record:
    """One parsed record and where it came from (``file:line``)."""

    where: str
    kind: Literal["messages", "prompt", "text"]
    value: Any


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                      and p.suffix not in TEXT_SUFFIXES_SKIPPED)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    return [path]


def _parse_line(line: str, where: str) -> Record:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: messages must be a non-empty list")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{j}] must be an object with string role and content")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: messages has no assistant message to learn from")
        return Record(where, "messages", messages)
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise DataError(f"{where}: prompt and completion must both be strings, completion non-empty")
        return Record(where, "prompt", (prompt, completion))
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DataError(f"{where}: text must be a non-empty string")
        return Record(where, "text", obj["text"])
    raise DataError(f"{where}: a record needs messages, prompt + completion, or text (keys: {sorted(obj)})")


def read_records(paths: tuple[str, ...], *, strict: bool = False,
                 report: Callable[[str], None] = print) -> Iterator[Record]:
    """Every record of every file, one at a time; bad lines reported (``report``) and skipped, or raised
    (``strict``)."""
    for root in paths:
        for file in _files(Path(root)):
            if file.suffix != ".jsonl":
                text = file.read_text(errors="replace")
                if text.strip():
                    yield Record(str(file), "text", text)
                continue
            with file.open(encoding="utf-8", errors="strict") as f:
                lineno = 0
                while True:
                    lineno += 1
                    where = f"{file}:{lineno}"
                    try:
                        line = f.readline()
                    except UnicodeDecodeError as e:
                        raise DataError(f"{where}: not UTF-8 ({e.reason})") from None
                    if not line:
                        break
                    if not line.strip():
                        continue
                    try:
                        yield _parse_line(line, where)
                    except DataError as e:
                        if strict:
                            raise
                        report(f"skipped {e}")


class ChatRenderer:
    """A Jinja chat template rendered as transformers renders it (serve/text.py's ChatTemplate), with or without
    the generation prompt."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        from deepseek_moe.serve.text import ChatTemplate

        self.template = ChatTemplate(source, bos_token, eos_token)

    @classmethod
    def for_checkpoint(cls, path: Path, eos_token: str | None = None) -> ChatRenderer:
        from deepseek_moe.serve.text import ChatTemplate

        t = ChatTemplate.for_checkpoint(path, eos_token)
        return cls(t.source, t.bos_token, t.eos_token)

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        t = self.template
        return str(t.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=t.bos_token, eos_token=t.eos_token))

    def segments(self, messages: list[dict[str, str]], where: str) -> list[tuple[str, bool]]:
        """(text, trained) pieces whose concatenation is the whole rendered conversation; trained pieces are the
        assistant replies (with the template's end-of-turn text)."""
        full = self.render(messages, add_generation_prompt=False)
        pieces: list[tuple[str, bool]] = []
        done = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1], add_generation_prompt=False)
            if not (upto.startswith(before) and full.startswith(upto) and len(before) >= done):
                raise DataError(f"{where}: the chat template does not render this conversation as a sequence of "
                                f"prefixes (message {i}), so the assistant tokens cannot be told apart")
            pieces += [(full[done:len(before)], False), (upto[len(before):], True)]
            done = len(upto)
        pieces.append((full[done:], False))
        return [(text, trained) for text, trained in pieces if text]


class Tokenise:
    """Records to examples with the base's tokenizer (a ``tokenizers.Tokenizer``) and chat template."""

    def __init__(self, tokenizer: Any, eos_id: int | None, *, chat: ChatRenderer | None = None,
                 loss_on: LossOn = "completion") -> None:
        self.tokenizer, self.eos_id, self.chat, self.loss_on = tokenizer, eos_id, chat, loss_on

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def __call__(self, record: Record) -> Example:
        eos = [] if self.eos_id is None else [self.eos_id]
        pieces: list[tuple[list[int], bool]]
        if record.kind == "messages":
            if self.chat is None:
                raise DataError(f"{record.where}: chat records need the base's chat template")
            pieces = [(self._encode(text), trained) for text, trained in self.chat.segments(record.value, record.where)]
        elif record.kind == "prompt":
            prompt, completion = record.value
            pieces = [(self._encode(prompt), False), (self._encode(completion) + eos, True)]
        else:
            pieces = [(self._encode(record.value) + eos, True)]
        ids = [t for part, _ in pieces for t in part]
        if not ids:
            raise DataError(f"{record.where}: tokenises to nothing")
        mask = [trained or self.loss_on == "all" for part, trained in pieces for _ in part]
        if not any(mask):
            raise DataError(f"{record.where}: no token to learn from (the trained part tokenises to nothing)")
        return Example(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool))


def examples(records: Iterator[Record], tokenise: Tokenise, *, strict: bool = False,
             report: Callable[[str], None] = print) -> Iterator[Example]:
    """Tokenised records; one that cannot be tokenised is reported and skipped (raised with ``strict``)."""
    for record in records:
        try:
            yield tokenise(record)
        except DataError as e:
            if strict:
                raise
            report(f"skipped {e}")
