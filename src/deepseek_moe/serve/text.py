"""Text in and out: prompts to token ids (with the checkpoint's chat template), tokens back to text as they come.

Chat prompts use the Jinja ``chat_template`` of the checkpoint's ``tokenizer_config.json`` when it has one,
rendered as transformers renders it (sandboxed, ``trim_blocks``/``lstrip_blocks``, with ``messages``,
``add_generation_prompt=True``, ``bos_token``, ``eos_token`` and ``raise_exception``). Without one the plain
default ``DEFAULT_CHAT_TEMPLATE`` is used: the messages as ``Role: content`` apart by a blank line, then
``Assistant:`` for the reply, e.g. ``"System: Be brief.\\n\\nUser: Hi\\n\\nAssistant:"``; an assistant's message
ends with the checkpoint's end-of-text token (``eos_token_id`` of config.json), so that a model fine-tuned on chats
rendered this way learns to end its reply with the token generation stops on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_CONFIG = "tokenizer_config.json"
# End-of-text tokens of the tokenizers we meet, tried when config.json has no eos_token_id.
EOS_NAMES = ("<|endoftext|>", "<｜end▁of▁sentence｜>", "</s>", "<eos>")
# The blank line goes before a message, not after it, so that an assistant's message rendered alone ends with its
# eos token: the tokens a fine-tune trains on are exactly the reply and its end (finetune/data.py's segments).
# '\n\n' is written as an expression because trim_blocks would eat a newline right after a block tag.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n\\n' }}{% endif %}Assistant:{% endif %}"
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
    def for_checkpoint(cls, path: Path | None, eos_token: str | None = None) -> ChatTemplate:
        """The template in ``path/tokenizer_config.json`` if there is one, else the plain default, whose replies
        end with ``eos_token`` (by default the end-of-text token of ``path``'s config.json and tokenizer.json)."""
        file = None if path is None else path / TOKENIZER_CONFIG
        config = json.loads(file.read_text()) if file is not None and file.is_file() else {}
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        if not isinstance(source, str):
            if eos_token is None:
                eos_token = _token_text(config.get("eos_token")) or eos_text(path)
            return cls(DEFAULT_CHAT_TEMPLATE, eos_token=eos_token)
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    @property
    def is_default(self) -> bool:
        return self.source == DEFAULT_CHAT_TEMPLATE


def eos_text(path: Path | None) -> str:
    """The text of the token generation stops on (``stop_token_ids``: ``eos_token_id`` of ``path/config.json``,
    else one of ``EOS_NAMES``) in ``path/tokenizer.json``; "" where there is none."""
    if path is None or not (path / "tokenizer.json").is_file():
        return ""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    config = path / "config.json"
    eos = json.loads(config.read_text()).get("eos_token_id") if config.is_file() else None
    eos = eos[0] if isinstance(eos, list) and eos else eos
    stops = stop_token_ids(eos if isinstance(eos, int) else None, tokenizer, tokenizer.get_vocab_size())
    return next((str(tokenizer.id_to_token(i) or "") for i in stops), "")


def stop_token_ids(eos_token_id: int | None, tokenizer: Any, vocab_size: int) -> frozenset[int]:
    """The eos id of config.json, else the tokenizer's end-of-text token, else none."""
    if eos_token_id is not None:
        return frozenset({eos_token_id})
    for name in EOS_NAMES:
        token = tokenizer.token_to_id(name)
        if token is not None and token < vocab_size:
            return frozenset({token})
    return frozenset()


class IncrementalDetokenizer:
    """Tokens to text one at a time, with constant work per token, equal to decoding them all at once.

    Decoding the whole output at every token is quadratic. Decoding each token alone is wrong twice over: a
    byte-level BPE token may hold part of a multi-byte character, and decoders such as SentencePiece's strip a
    leading space from the first token of what they are given. So (as vLLM does) each step decodes a short window
    ``ids[prefix:]`` that starts at a boundary where earlier text was complete, and releases what it adds beyond
    the ``sent`` characters of the window already released. A trailing U+FFFD is held back, since the next token
    may complete that character; every earlier character is final. Once the window's text ends on a complete
    character, the window moves up to the previous such boundary (kept as context for the decoder).

    Output that stays incomplete for long (a run of byte tokens that never form valid UTF-8) would grow the
    window without bound, so past ``MAX_WINDOW`` tokens it is cut at the latest token boundary where decoding
    the two halves apart gives the same text as decoding them together.
    """

    MAX_WINDOW = 16

    def __init__(self, tokenizer: Any, skip_ids: frozenset[int] = frozenset()) -> None:
        # Special tokens are left out here rather than by decode(skip_special_tokens=True), which would leave
        # one at the start of a window, where it changes what the decoder does with the token after it.
        added = getattr(tokenizer, "get_added_tokens_decoder", None)
        special = {i for i, t in added().items() if t.special} if added is not None else set()
        self.tokenizer, self.skip_ids = tokenizer, skip_ids | special
        self.ids: list[int] = []
        self.prefix = 0  # the window's start: text before it is complete and released
        self.read = 0  # the latest boundary after ``prefix`` where the text was complete
        self.sent = 0  # characters of decode(ids[prefix:]) already released

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token: int) -> str:
        """The text this token completes ('' if none yet)."""
        if token in self.skip_ids:
            return ""
        self.ids.append(token)
        text = self._decode(self.ids[self.prefix:])
        if not text.endswith("\ufffd"):
            out = text[self.sent:]
            self.prefix, self.read = self.read, len(self.ids)
            self.sent = len(self._decode(self.ids[self.prefix:]))
            return out
        out = text[self.sent:-1]  # all but the trailing U+FFFD is final
        self.sent = max(self.sent, len(text) - 1)
        if len(self.ids) - self.prefix > self.MAX_WINDOW:
            self._cut(text)
        return out

    def _cut(self, text: str) -> None:
        for i in range(len(self.ids) - 1, self.prefix, -1):
            left, right = self._decode(self.ids[self.prefix:i]), self._decode(self.ids[i:])
            if left + right == text and len(left) <= self.sent:
                self.prefix = self.read = i
                self.sent -= len(left)
                return

    def finish(self) -> str:
        """What is still held, less an incomplete last character (U+FFFD would be noise)."""
        text = self._decode(self.ids[self.prefix:]).removesuffix("\ufffd")
        out = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return out


class TextAssembler:
    """Turns a request's tokens into text deltas, holding back what may still change.

    An ``IncrementalDetokenizer`` gives the text each token completes. With stop strings, the last
    ``len(longest stop) - 1`` characters also wait, since they may begin a stop string; when one appears the text
    is cut before it and ``stopped`` is set. Only the held text is searched: a stop string that began in released
    text would have been complete, and found, when that text was released.
    """

    def __init__(self, tokenizer: Any, stop: list[str] | None, stop_token_ids: frozenset[int]) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, stop_token_ids)
        self.stop = stop or []
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """The text this token releases ('' if none yet)."""
        if self.stopped:
            return ""
        self.pending += self.detokenizer.add(token)
        return self._release(self.hold)

    def finish(self) -> str:
        """Whatever is still held."""
        if self.stopped:
            return ""
        self.pending += self.detokenizer.finish()
        return self._release(0)

    def _release(self, hold: int) -> str:
        found = [at for at in (self.pending.find(s) for s in self.stop) if at >= 0]
        if found:
            self.stopped = True
            out, self.pending = self.pending[:min(found)], ""
            return out
        cut = max(len(self.pending) - hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the printable character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenBytes:
    """A token's own bytes (OpenAI's logprobs ``bytes``), also for a token that ends inside a multi-byte
    character, whose decoded text alone is U+FFFD: byte-level BPE vocabularies spell each byte with one
    character, which is undone here; other tokenizers give the UTF-8 of the token decoded alone."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.alphabet: dict[str, int] | None = None
        self.special: dict[int, str] = {}
        try:
            spec = json.loads(tokenizer.to_str())
        except Exception:  # not a tokenizers.Tokenizer: fall back to decoding
            return
        if (spec.get("decoder") or {}).get("type") == "ByteLevel":
            self.alphabet = _byte_level_alphabet()
            self.special = {int(t["id"]): str(t["content"]) for t in spec.get("added_tokens") or []}

    def __call__(self, token: int) -> bytes:
        if self.alphabet is None or token in self.special:
            return str(self.special.get(token, self.tokenizer.decode([token]))).encode()
        piece = self.tokenizer.id_to_token(token)
        if piece is None or any(c not in self.alphabet for c in piece):
            return str(self.tokenizer.decode([token])).encode()
        return bytes(self.alphabet[c] for c in piece)
