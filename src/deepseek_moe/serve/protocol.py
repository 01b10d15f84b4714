"""The OpenAI request fields we accept, checked one by one; anything wrong becomes an ``ApiError`` naming the
field, which the app turns into an OpenAI-style error object.

``decode_body`` turns the raw body into JSON and refuses, before any field is read, what JSON allows but no
request needs: ``NaN``/``Infinity`` (Python's json accepts them), strings that are not Unicode text (a lone
surrogate such as ``"\\ud800"`` cannot be encoded to UTF-8 for the tokenizer), and nesting deeper than
``MAX_DEPTH``; each error names the path to the value (``messages[0].content``).

``logprobs`` (completions: an integer 0..20, the alternatives per token; chat: ``logprobs: true`` with
``top_logprobs`` 0..20, which without ``logprobs: true`` is a 400) asks for log-probabilities (serve/logprobs.py).
``n`` (1..MAX_N) asks for that many choices of one prompt. Fields common clients send with default or no-op values (``stream_options``, ``user``, zero
penalties, ``echo: false``) are accepted; a non-default value of a field we do not implement is a
400, never silently ignored. An unknown field is a 400 too (OpenAI ignores some): a misspelt ``max_token``
would otherwise generate to the default length without a word. Every number is range-checked (``seed`` fits an
int64, ``temperature`` in [0, 2], ...); ``ignore_eos`` (vLLM's name) is our extension, as is
``stream_options.continuous_usage_stats`` (vLLM's: usage on every chunk). Structured output: OpenAI's
``response_format`` (accepted on completions too, as vLLM does) and vLLM's ``guided_regex`` / ``guided_grammar``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from deepseek_moe.serve.request import MAX_LOGPROBS, MAX_N
from deepseek_moe.serve.structured import OutputFormat, json_object_format

MAX_BODY_BYTES = 4 << 20  # the default limit on a request body (serve's --max-request-bytes)
MAX_DEPTH = 32  # a real request nests 4 deep (messages[i].content[j].text)
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 512  # text is held back by the longest stop string's length, so it is bounded
INT64 = (-(1 << 63), (1 << 63) - 1)
_SURROGATE = re.compile("[\ud800-\udfff]")


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


def _non_finite(name: str) -> float:
    return math.nan if name == "NaN" else (math.inf if name == "Infinity" else -math.inf)


def decode_body(raw: bytes) -> Any:
    """The request body as JSON: UTF-8, parseable, finite numbers, Unicode strings, at most MAX_DEPTH deep."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})",
                       code="invalid_utf8") from None
    try:
        value = json.loads(text, parse_constant=_non_finite)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       code="invalid_json") from None
    except RecursionError:  # json's parser recurses per nesting level
        raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json") from None
    except ValueError as e:  # an integer of more than 4300 digits (Python's int-from-string limit)
        raise ApiError(400, f"the request body is not acceptable JSON: {e}", code="invalid_json") from None
    _check_values(value)
    return value


def _check_values(root: Any) -> None:
    """Walk the parsed body (iteratively: no recursion limit to hit) for what JSON allows and a request must
    not hold."""
    stack: list[tuple[Any, str, int]] = [(root, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                at = _SURROGATE.search(value)
                assert at is not None
                raise bad(path or "body", f"holds a lone surrogate (U+{ord(at.group()):04X} at character "
                          f"{at.start()}), which is not Unicode text", code="invalid_unicode")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise bad(path or "body", f"{value} is not a number JSON allows (NaN and Infinity are refused)")
        elif isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels (at {path})",
                               param=path, code="invalid_json")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                    raise bad(path or "body", "holds a key with a lone surrogate, which is not Unicode text",
                              code="invalid_unicode")
                if isinstance(item, str | float | dict | list):
                    child = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
                    stack.append((item, child, depth + 1))


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
    include_usage: bool = False  # a last chunk with usage and no choices, as OpenAI sends
    continuous_usage: bool = False  # usage on every chunk (vLLM's continuous_usage_stats)
    ignore_eos: bool = False
    output_format: OutputFormat | None = None  # structured output: what the text must match
    logprobs: int | None = None  # None: no logprobs; else how many top alternatives per token (0..MAX_LOGPROBS)
    n: int = 1  # choices (1..MAX_N), each with its own sampling; choice i is seeded with seed + i
    echo: bool = False  # completions: the prompt (and with logprobs its tokens' logprobs) before the completion


COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "stream_options",
          "ignore_eos", "n", "user", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
          "response_format", "guided_regex", "guided_grammar"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                        "parallel_tool_calls"}
FORMAT_FIELDS = ("response_format", "guided_regex", "guided_grammar")
JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}
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
    if not ((lo < x) if lo_open else (lo <= x)) or not x <= hi:  # NaN fails both
        raise bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {x}")
    return float(x)


def _optional_int(body: dict[str, Any], name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    x = body.get(name)
    if x is None:
        return None
    if not _is_int(x):
        raise bad(name, f"must be an integer, got {type(x).__name__}")
    if lo is not None and x < lo:
        raise bad(name, f"must be >= {lo}, got {x}")
    if hi is not None and x > hi:
        raise bad(name, f"must be <= {hi}, got {x}")
    return int(x)


def _bool(body: dict[str, Any], name: str, where: str | None = None) -> bool:
    x = body.get(name)
    if x is None:
        return False
    if not isinstance(x, bool):
        raise bad(where or name, f"must be true or false, got {type(x).__name__}")
    return x


def _unsupported(body: dict[str, Any], name: str, allowed: tuple[Any, ...], what: str) -> None:
    """Accept only the default/no-op values of a field we do not implement."""
    if name in body and not any(body[name] == a and type(body[name]) is type(a) for a in allowed):
        raise bad(name, f"{_short(body[name])} is not supported ({what})", code="unsupported_value")


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _penalty(body: dict[str, Any], name: str) -> None:
    """OpenAI's range is [-2, 2]; we implement no penalty, so only 0 (or null) is accepted."""
    if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
        raise bad(name, f"{body[name]} is not supported (no penalties)", code="unsupported_value")


def _stop(body: dict[str, Any]) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", "must be a non-empty string or a list of non-empty strings")
    if len(stop) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop sequences, got {len(stop)}")
    longest = max((len(s) for s in stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise bad("stop", f"a stop sequence may be at most {MAX_STOP_CHARS} characters, got one of {longest}")
    return stop or None


def _output_format(body: dict[str, Any]) -> OutputFormat | None:
    """OpenAI's ``response_format`` (text, json_object, json_schema) or vLLM's ``guided_regex`` (a regular
    expression) / ``guided_grammar`` (here: a Lark grammar); at most one. Whether llguidance can compile it is
    checked later, with the tokenizer (``GrammarCompiler.constraint``)."""
    given = [k for k in FORMAT_FIELDS if body.get(k) is not None and body.get(k) != {"type": "text"}]
    if len(given) > 1:
        raise bad(given[1], f"only one of {', '.join(FORMAT_FIELDS)} may be given, got {' and '.join(given)}")
    if not given:
        return None
    name = given[0]
    value = body[name]
    if name != "response_format":
        if not isinstance(value, str) or not value:
            raise bad(name, f"must be a non-empty string, got {_short(value)}")
        return OutputFormat("regex" if name == "guided_regex" else "lark", value, name)
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad(name, 'must be an object with a "type": text, json_object or json_schema')
    kind = value["type"]
    extra = sorted(set(value) - {"type", "json_schema"} if kind == "json_schema" else set(value) - {"type"})
    if extra:
        raise bad(f"{name}.{extra[0]}", f"is not a field of a {kind!r} response_format")
    if kind == "json_object":
        return json_object_format(name)
    if kind != "json_schema":
        raise bad(f"{name}.type", f"{_short(kind)} is not supported (text, json_object or json_schema)",
                  code="unsupported_value")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad(f"{name}.json_schema", "must be an object with name and schema (OpenAI's json_schema format)")
    unknown = sorted(set(spec) - JSON_SCHEMA_KEYS)
    if unknown:
        raise bad(f"{name}.json_schema.{unknown[0]}", "is not a field of json_schema (name, description, schema, "
                  "strict)")
    for key, kinds in (("name", str), ("description", str), ("strict", bool)):
        if spec.get(key) is not None and not isinstance(spec[key], kinds):
            raise bad(f"{name}.json_schema.{key}", f"must be a {kinds.__name__}, got {type(spec[key]).__name__}")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise bad(f"{name}.json_schema.schema", f"must be a JSON schema object, got {_short(schema)}")
    return OutputFormat("json_schema", json.dumps(schema), f"{name}.json_schema.schema")


def _common(body: Any, fields: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise bad(unknown[0], "unrecognized request argument (supported: " + ", ".join(sorted(fields)) + ")")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"must be a string, got {type(model).__name__}")
    _penalty(body, "presence_penalty")
    _penalty(body, "frequency_penalty")
    _unsupported(body, "logit_bias", ({}, None), "no logit bias")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user", f"must be a string, got {type(body['user']).__name__}")
    top_k = _optional_int(body, "top_k", lo=-1)
    if top_k == 0:
        raise bad("top_k", "must be >= 1 (or -1 / null for no limit), got 0")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = continuous = False
    if options is not None:
        known = {"include_usage", "continuous_usage_stats"}
        if not isinstance(options, dict) or set(options) - known:
            raise bad("stream_options", "must be an object with include_usage and/or continuous_usage_stats "
                      "(true/false)")
        include_usage = _bool(options, "include_usage", "stream_options.include_usage")
        continuous = _bool(options, "continuous_usage_stats", "stream_options.continuous_usage_stats")
        if not stream:
            raise bad("stream_options", "is only allowed when stream is true")
    return {"model": model, "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            "top_k": None if top_k in (None, -1) else top_k, "stop": _stop(body),
            "seed": _optional_int(body, "seed", *INT64), "stream": stream, "include_usage": include_usage,
            "continuous_usage": continuous, "ignore_eos": _bool(body, "ignore_eos"),
            "output_format": _output_format(body), "n": _optional_int(body, "n", 1, MAX_N) or 1}


def _max_tokens(body: dict[str, Any], name: str) -> int | None:
    """>= 1 here; <= what the context leaves after the prompt is checked once the prompt is tokenized. 0 is a
    completions request's with ``echo`` alone (``parse_completion``), so its error says where 0 would do."""
    if body.get(name) == 0 and _is_int(body[name]):
        raise bad(name, "must be >= 1, got 0 (0 is allowed only with echo: true on /v1/completions, which scores "
                        "the prompt without generating)")
    return _optional_int(body, name, lo=1)


def parse_completion(body: Any) -> GenerationRequest:
    fields = _common(body, COMPLETION_FIELDS)
    echo = _bool(body, "echo")
    _unsupported(body, "best_of", (1, None), "one candidate per request")
    _unsupported(body, "suffix", (None, ""), "no insertion")
    logprobs = None if body.get("logprobs") is False else _optional_int(body, "logprobs", 0, MAX_LOGPROBS)
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
    # max_tokens 0 with echo scores the prompt alone (OpenAI allows it; evaluation harnesses use it).
    max_tokens = _optional_int(body, "max_tokens", lo=0) if echo else _max_tokens(body, "max_tokens")
    return GenerationRequest(prompt_text=text, prompt_ids=ids, max_tokens=max_tokens, logprobs=logprobs, echo=echo,
                             **fields)


def parse_chat(body: Any) -> GenerationRequest:
    fields = _common(body, CHAT_FIELDS)
    wanted = _bool(body, "logprobs")
    top = _optional_int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top and not wanted:
        raise bad("top_logprobs", f"{top} needs logprobs: true")
    _unsupported(body, "tools", ([], None), "no tool calls")
    _unsupported(body, "tool_choice", ("none", None), "no tool calls")
    _unsupported(body, "parallel_tool_calls", (False, True, None), "no tool calls")
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
            raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {_short(role)}")
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
        if msg.get("name") is not None and not isinstance(msg["name"], str):
            raise bad(f"{where}.name", f"must be a string, got {type(msg['name']).__name__}")
        parsed.append({"role": role, "content": content})
    if not any(m["content"] for m in parsed):
        raise bad("messages", "every message is empty")
    max_tokens = _max_tokens(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _max_tokens(body, "max_tokens")
    return GenerationRequest(messages=parsed, max_tokens=max_tokens, logprobs=(top or 0) if wanted else None,
                             **fields)
