"""Text in and out: prompts to token ids (with the checkpoint's chat template), tokens back to text as they come.

Chat prompts use the Jinja ``chat_template`` of the checkpoint's ``tokenizer_config.json`` when it has one,
rendered as transformers renders it (sandboxed, ``trim_blocks``/``lstrip_blocks``, with ``messages``,
``add_generation_prompt=True``, ``bos_token``, ``eos_token`` and ``raise_exception``). Without one the plain
default ``DEFAULT_CHAT_TEMPLATE`` is used: each message as ``Role: content`` followed by a blank line, then
``Assistant:`` for the reply, e.g. ``"System: Be brief.\\n\\nUser: Hi\\n\\nAssistant:"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_CONFIG = "tokenizer_config.json"
# End-of-text tokens of the tokenizers we meet, tried when config.json has no eos_token_id.
EOS_NAMES = ("<|endoftext|>", "<｜end▁of▁sentence｜>", "</s>", "<eos>")
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _token_text(value: Any) -> str:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token

    def render(self, messages: list[dict[str, str]]) -> str:
        return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                    eos_token=self.eos_token)

    @classmethod
    def for_checkpoint(cls, path: Path | None) -> ChatTemplate:
        """The template in ``path/tokenizer_config.json`` if there is one, else the plain default."""
        file = None if path is None else path / TOKENIZER_CONFIG
        if file is None or not file.is_file():
            return cls(DEFAULT_CHAT_TEMPLATE)
        config = json.loads(file.read_text())
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        if not isinstance(source, str):
            return cls(DEFAULT_CHAT_TEMPLATE)
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    @property
    def is_default(self) -> bool:
        return self.source == DEFAULT_CHAT_TEMPLATE


def stop_token_ids(eos_token_id: int | None, tokenizer: Any, vocab_size: int) -> frozenset[int]:
    """The eos id of config.json, else the tokenizer's end-of-text token, else none."""
    if eos_token_id is not None:
        return frozenset({eos_token_id})
    for name in EOS_NAMES:
        token = tokenizer.token_to_id(name)
        if token is not None and token < vocab_size:
            return frozenset({token})
    return frozenset()


class TextAssembler:
    """Turns a request's tokens into text deltas, holding back what may still change.

    The whole output is decoded at each token and only the new suffix released: a byte-level BPE token may hold
    part of a multi-byte character (decoded alone it ends in U+FFFD, so it waits for the next token). With stop
    strings, the last ``len(longest stop) - 1`` characters also wait, since they may begin a stop string; when
    one appears the text is cut before it and ``stopped`` is set.
    """

    def __init__(self, tokenizer: Any, stop: list[str] | None, stop_token_ids: frozenset[int]) -> None:
        self.tokenizer, self.stop, self.stop_token_ids = tokenizer, stop or [], stop_token_ids
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.released = 0
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """The text this token releases ('' if none yet)."""
        if self.stopped:
            return ""
        if token not in self.stop_token_ids:
            self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.text.endswith("\ufffd"):
            return ""
        for s in self.stop:
            # Search from where an unreleased stop string could begin.
            at = self.text.find(s, max(self.released - len(s) + 1, 0))
            if at >= 0:
                self.stopped = True
                self.text = self.text[:at]
                return self._release(len(self.text))
        return self._release(len(self.text) - self.hold)

    def finish(self) -> str:
        """Whatever is still held (an incomplete last character is dropped as U+FFFD would be noise)."""
        return self._release(len(self.text.removesuffix("\ufffd")))

    def _release(self, upto: int) -> str:
        if upto <= self.released:
            return ""
        out = self.text[self.released:upto]
        self.released = upto
        return out
