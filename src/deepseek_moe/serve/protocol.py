"""The OpenAI request fields we accept, checked one by one; anything wrong becomes an ``ApiError`` naming the
field, which the app turns into an OpenAI-style error object.

Fields common clients send with default or no-op values (``n: 1``, ``logprobs: null/false``, ``stream_options``,
``user``, zero penalties, ``echo: false``) are accepted; a non-default value of a field we do not implement is a
400, never silently ignored, and so is a field we do not know. ``ignore_eos`` (vLLM's name) is our extension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ApiError(Exception):
    """An error for the client: HTTP ``status``, OpenAI's ``type`` and ``code``, and the ``param`` at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """What both endpoints ask for, validated. Exactly one of ``prompt_text`` / ``prompt_ids`` / ``messages``."""

    model: str | None
    prompt_text: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = None  # None: up to the context (chat) or 16 (completions, OpenAI's default)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "stream_options",
          "ignore_eos", "n", "user", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                        "tool_choice", "parallel_tool_calls"}
ROLES = ("system", "developer", "user", "assistant")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    x = body.get(name)
    if x is None:
        return default
    if not _is_number(x):
        raise bad(name, f"must be a number, got {type(x).__name__}")
    if not ((lo < x) if lo_open else (lo <= x)) or x > hi:
        raise bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {x}")
    return float(x)


def _optional_int(body: dict[str, Any], name: str) -> int | None:
    x = body.get(name)
    if x is not None and not _is_int(x):
        raise bad(name, f"must be an integer, got {type(x).__name__}")
    return x


def _bool(body: dict[str, Any], name: str) -> bool:
    x = body.get(name)
    if x is None:
        return False
    if not isinstance(x, bool):
        raise bad(name, f"must be true or false, got {type(x).__name__}")
    return x


def _unsupported(body: dict[str, Any], name: str, allowed: tuple[Any, ...], what: str) -> None:
    """Accept only the default/no-op values of a field we do not implement."""
    if name in body and not any(body[name] == a and type(body[name]) is type(a) for a in allowed):
        raise bad(name, f"{body[name]!r} is not supported ({what})", code="unsupported_value")


def _common(body: Any, fields: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise bad(unknown[0], "unrecognized request argument (supported: " + ", ".join(sorted(fields)) + ")")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"must be a string, got {type(model).__name__}")
    _unsupported(body, "n", (1, None), "one choice per request; send n requests")
    _unsupported(body, "presence_penalty", (0, 0.0, None), "no penalties")
    _unsupported(body, "frequency_penalty", (0, 0.0, None), "no penalties")
    _unsupported(body, "logit_bias", ({}, None), "no logit bias")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user", f"must be a string, got {type(body['user']).__name__}")
    top_k = _optional_int(body, "top_k")
    if top_k is not None and top_k != -1 and top_k < 1:
        raise bad("top_k", f"must be >= 1 (or -1 / null for no limit), got {top_k}")
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        if len(stop) > 4:
            raise bad("stop", f"at most 4 stop sequences, got {len(stop)}")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise bad("stream_options", "must be an object with include_usage (true/false)")
        include_usage = _bool(options, "include_usage")
        if not stream:
            raise bad("stream_options", "is only allowed when stream is true")
    seed = _optional_int(body, "seed")
    return {"model": model, "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            "top_k": None if top_k in (None, -1) else top_k, "stop": stop or None, "seed": seed,
            "stream": stream, "include_usage": include_usage, "ignore_eos": _bool(body, "ignore_eos")}


def _max_tokens(body: dict[str, Any], name: str) -> int | None:
    n = _optional_int(body, name)
    if n is not None and n < 1:
        raise bad(name, f"must be >= 1, got {n}")
    return n


def parse_completion(body: Any) -> GenerationRequest:
    fields = _common(body, COMPLETION_FIELDS)
    _unsupported(body, "echo", (False, None), "the prompt is not echoed")
    _unsupported(body, "best_of", (1, None), "one candidate per request")
    _unsupported(body, "suffix", (None, ""), "no insertion")
    _unsupported(body, "logprobs", (None, False), "no log-probabilities")
    if "prompt" not in body or body["prompt"] is None:
        raise bad("prompt", "is required")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    text, ids = None, None
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "is empty")
        text = prompt
    elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        if not prompt:
            raise bad("prompt", "is empty")
        ids = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise bad("prompt", f"a batch of {len(prompt)} prompts is not supported; send one request per prompt",
                  code="unsupported_value")
    else:
        raise bad("prompt", "must be a string or a list of token ids")
    return GenerationRequest(prompt_text=text, prompt_ids=ids, max_tokens=_max_tokens(body, "max_tokens"), **fields)


def parse_chat(body: Any) -> GenerationRequest:
    fields = _common(body, CHAT_FIELDS)
    _unsupported(body, "logprobs", (False, None), "no log-probabilities")
    _unsupported(body, "top_logprobs", (0, None), "no log-probabilities")
    _unsupported(body, "tools", ([], None), "no tool calls")
    _unsupported(body, "tool_choice", ("none", None), "no tool calls")
    _unsupported(body, "parallel_tool_calls", (False, True, None), "no tool calls")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad("response_format", f"{fmt!r} is not supported (plain text only)", code="unsupported_value")
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "is required")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of {role, content} objects")
    parsed = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad(where, "must be an object with role and content")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"{where}.content", "only text parts ({type: text, text: ...}) are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content", f"must be a string, got {type(content).__name__}")
        extra = set(msg) - {"role", "content", "name"}
        if extra:
            raise bad(f"{where}.{sorted(extra)[0]}", "is not supported")
        parsed.append({"role": role, "content": content})
    if not any(m["content"] for m in parsed):
        raise bad("messages", "every message is empty")
    max_tokens = _max_tokens(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _max_tokens(body, "max_tokens")
    return GenerationRequest(messages=parsed, max_tokens=max_tokens, **fields)
