"""Structured output: token masks that keep a request's output inside a JSON schema, a regular expression or a
Lark grammar, computed by llguidance (the ``structured`` extra) and applied to a batch of logits at once.

A request asks for a format (``OutputFormat``: OpenAI's ``response_format`` json_object / json_schema, or vLLM's
``guided_regex`` / ``guided_grammar``); ``GrammarCompiler.constraint`` compiles it (on the HTTP worker thread,
so a bad schema is a 400 before the request is queued) into a ``Constraint``, which holds one llguidance matcher
per choice (a request's ``n`` choices share one compile: ``Constraint.copy``). At each step the scheduler calls
``constrain`` on the rows it is about to sample: one llguidance call per constrained row fills its row of a
packed bitmask (B, ceil(V / 32)) int32 (the loop over the vocabulary runs in Rust; one call per row measured
faster on our 2 shared cores than llguidance's thread pool, 2.2 ms vs 1.1 ms for 8 rows), and ``apply_token_bitmask`` unpacks it and sets the disallowed logits to -inf in
one masked_fill for the batch (``apply_token_bitmask_reference`` is the slow obvious twin). A step without
constrained rows does nothing more than look at each row's ``constraint`` attribute.

Why llguidance (``benchmarks/structured_backends.py``; table in docs/serving.md): masks cost about the same in
llguidance, xgrammar and outlines-core (60-70 us at 32k tokens on a busy machine); llguidance has no dependencies
(xgrammar pulls triton and apache-tvm-ffi), takes a ``tokenizers`` tokenizer as its JSON text (outlines-core
needs a hand-built byte vocabulary), compiles a schema in milliseconds (outlines-core: 2.6 s, as it builds the
whole regex-by-vocabulary index up front), and reads JSON schema, regular expressions and Lark grammars alike.

JSON is generated compact-with-spaces (``", "`` and ``": "``, as ``json.dumps`` writes it) rather than with free
whitespace: a grammar that allows any whitespace lets a weak model emit newlines forever.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

EXTRA = "structured"  # pip install 'deepseek_moe[structured]'
# Bounds on what one request's format may cost (a hostile pattern is a 400 naming its field, not a stalled worker):
MAX_FORMAT_CHARS = 256 * 1024  # a schema, regex or grammar's text; a 20,000-word alternation (260k) compiles in ~0.3 s
# llguidance's resource limits, its defaults but one: initial_lexer_fuel bounds the work of building a regex's lexer
# before the first mask. At llguidance's 1,000,000 a counted repetition like a{1000000} or (a{1000}){1000} took
# 1.0-2.5 s of a worker thread and ~130 MB, and then failed at its first token anyway; at 100,000 it takes 0.05-0.12
# s and the compile-time probe (``GrammarCompiler.constraint``) refuses it. No error text echoes the grammar back.
LIMITS = {"initial_lexer_fuel": 100_000, "verbose_errors": False}
# What llguidance's errors say when a grammar ran past LIMITS (or its fixed ones) while a request was generating.
LIMIT_ERRORS = ("too many", "fuel", "limit", "exceeded")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
BITS = 32


@dataclass(frozen=True)
class OutputFormat:
    """What a request's output must match. kind "json_schema": ``source`` is the schema as JSON text
    (``json_object`` is the schema ``{"type": "object"}``); "regex": a regular expression the whole output must
    match; "lark": a Lark grammar (llguidance's dialect: EBNF-style rules, regex terminals, ``%json``).
    ``param`` is the request field it came from, named in errors."""

    kind: Literal["json_schema", "regex", "lark"]
    source: str
    param: str


class FormatError(ValueError):
    """A format that cannot be compiled; ``param`` names the request field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise FormatError("response_format", "structured output needs llguidance, which is not installed "
                          f"(pip install 'deepseek_moe[{EXTRA}]')") from None
    return llguidance


class Constraint:
    """One request's grammar state: which tokens may come next, advanced by each token the request emits.
    ``param``: the request field the grammar came from, named when it runs past llguidance's limits."""

    def __init__(self, matcher: Any, param: str = "response_format") -> None:
        self.matcher, self.param = matcher, param

    def copy(self) -> Constraint:
        """An independent copy of this state (llguidance's ``deep_copy``: the compiled grammar and its lexer states
        are shared, the parser position is not), for a request's other choices: one compile serves all ``n``."""
        return Constraint(self.matcher.deep_copy(), self.param)

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            error = str(self.matcher.get_error())
            if any(words in error for words in LIMIT_ERRORS):  # the grammar's doing: the request's 400
                raise FormatError(self.param, "the format ran past the structured-output engine's limits "
                                          f"while generating ({_first_line(error)}); simplify it")
            raise RuntimeError(f"structured output: token {token} is not allowed by the grammar ({error})")

    @property
    def finished(self) -> bool:
        """The grammar is complete and took its end-of-text token (or nothing more can follow)."""
        return bool(self.matcher.is_stopped())

    def fill(self, bitmask_W: torch.Tensor) -> None:
        """The allowed next tokens into one contiguous int32 row of a bitmask."""
        self.matcher.unsafe_compute_mask_ptr(bitmask_W.data_ptr(), bitmask_W.numel() * 4)


class GrammarCompiler:
    """Compiles ``OutputFormat``s for one tokenizer. llguidance's view of the tokenizer (about 0.75 s to build on a
    32k vocabulary) is made at the first structured request, so a server that never gets one never pays."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_id: int | None) -> None:
        self.tokenizer, self.vocab_size, self.eos_token_id = tokenizer, vocab_size, eos_token_id
        self._lltokenizer: Any = None
        self._limits: Any = None
        self._lock = threading.Lock()

    def _tokenizer(self, param: str) -> Any:
        llg = _llguidance()
        if self.eos_token_id is None:
            raise FormatError(param, "this model has no end-of-text token, so structured output cannot end")
        with self._lock:
            if self._lltokenizer is None:
                self._lltokenizer = llg.LLTokenizer(self.tokenizer.to_str(), n_vocab=self.vocab_size,
                                                    eos_token=self.eos_token_id)
                self._limits = llg.LLParserLimits(**LIMITS)
            return self._lltokenizer

    def grammar(self, fmt: OutputFormat) -> str:
        """llguidance's grammar text for ``fmt``; raises FormatError for what it cannot express."""
        llg = _llguidance()
        if fmt.kind == "json_schema":
            return str(llg.LLMatcher.grammar_from_json_schema(fmt.source, overrides=JSON_OPTIONS))
        if fmt.kind == "regex":
            return str(llg.LLMatcher.grammar_from_regex(fmt.source))
        return str(llg.LLMatcher.grammar_from_lark(fmt.source))

    def constraint(self, fmt: OutputFormat) -> Constraint:
        """A fresh matcher for one request; FormatError (naming ``fmt.param``) for a format llguidance refuses
        (an unsupported JSON-schema keyword, a bad regex, a grammar that does not parse)."""
        llg = _llguidance()
        if len(fmt.source) > MAX_FORMAT_CHARS:
            raise FormatError(fmt.param, f"the {_what(fmt.kind)} is {len(fmt.source)} characters; at most "
                              f"{MAX_FORMAT_CHARS} are compiled")
        tokenizer = self._tokenizer(fmt.param)
        try:
            grammar = self.grammar(fmt)
        except ValueError as e:
            raise FormatError(fmt.param, f"not a valid JSON schema: {e}") from None
        error = llg.LLMatcher.validate_grammar(grammar, tokenizer, limits=self._limits)
        if error:
            raise FormatError(fmt.param, f"unsupported or invalid {_what(fmt.kind)}: {_first_line(error)}")
        matcher = llg.LLMatcher(tokenizer, grammar, log_level=0, limits=self._limits)
        constraint = Constraint(matcher, fmt.param)
        # The first mask builds the lexer's states, which can take long (bounded by LIMITS); here it costs this
        # request's worker thread, not a step of the whole batch. Later masks reuse those states.
        bitmask_W = torch.empty(bitmask_width(self.vocab_size), dtype=torch.int32)
        constraint.fill(bitmask_W)
        if matcher.is_error():
            raise FormatError(fmt.param, f"unsupported or invalid {_what(fmt.kind)}: "
                              f"{_first_line(matcher.get_error())}")
        # A probe: take the first allowed token on a copy. A pattern whose lexer blows up (counted repetitions
        # past the engine's limits) fails here, before the request is queued, instead of at its first token.
        allowed = allowed_tokens(bitmask_W[None], self.vocab_size)[0].nonzero().flatten().tolist()
        first = next((t for t in allowed if t != self.eos_token_id), None)
        probe = matcher.deep_copy()
        if first is not None and (not probe.consume_token(first) or probe.is_error()):
            raise FormatError(fmt.param, f"the {_what(fmt.kind)} runs past the structured-output engine's limits "
                              f"({_first_line(probe.get_error())}); bound its repetitions")
        return constraint


def _what(kind: str) -> str:
    return {"json_schema": "JSON schema", "regex": "regular expression", "lark": "Lark grammar"}[kind]


def _first_line(message: str) -> str:
    """llguidance's message on one line, short enough for an error body."""
    line = " ".join(part.strip() for part in message.strip().splitlines() if part.strip()) or "rejected"
    return line if len(line) <= 300 else line[:297] + "..."


def json_object_format(param: str = "response_format") -> OutputFormat:
    return OutputFormat("json_schema", json.dumps({"type": "object"}), param)


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + BITS - 1) // BITS


def allowed_tokens(bitmask_BW: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool from a packed (B, W) int32 bitmask: bit ``v % 32`` of word ``v // 32`` allows token v. numpy's
    unpackbits reads the words' bytes in little-endian bit order, which is that order on a little-endian host
    (~30 us for 8 x 32k tokens against ~1 ms for torch shifts and ands); elsewhere, the shifts."""
    if sys.byteorder == "little" and bitmask_BW.device.type == "cpu":
        bytes_B4W = bitmask_BW.contiguous().numpy().view(np.uint8)
        bits = np.unpackbits(bytes_B4W, axis=1, count=vocab_size, bitorder="little")
        return torch.from_numpy(bits).view(torch.bool)
    return allowed_tokens_by_shifts(bitmask_BW, vocab_size)


def allowed_tokens_by_shifts(bitmask_BW: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``allowed_tokens`` in torch alone (any device, any byte order)."""
    shifts = torch.arange(BITS, dtype=torch.int32, device=bitmask_BW.device)
    return ((bitmask_BW.unsqueeze(-1) >> shifts) & 1).view(bitmask_BW.shape[0], -1)[:, :vocab_size].bool()


def apply_token_bitmask(logits_BV: torch.Tensor, bitmask_BW: torch.Tensor) -> torch.Tensor:
    """logits with the tokens whose bit is 0 set to -inf, in place: one unpack and one masked_fill for the
    whole batch."""
    allowed_BV = allowed_tokens(bitmask_BW, logits_BV.shape[-1]).to(logits_BV.device)
    return logits_BV.masked_fill_(allowed_BV.logical_not_(), float("-inf"))


def apply_token_bitmask_reference(logits_BV: torch.Tensor, bitmask_BW: torch.Tensor) -> torch.Tensor:
    """The obvious twin of ``apply_token_bitmask``: a Python loop over every row and token."""
    out = logits_BV.clone()
    words = bitmask_BW.tolist()
    for b in range(logits_BV.shape[0]):
        for v in range(logits_BV.shape[1]):
            if not (words[b][v // BITS] >> (v % BITS)) & 1:
                out[b, v] = float("-inf")
    return out


def constrain(constraints: list[Constraint | None], logits_BV: torch.Tensor) -> torch.Tensor:
    """Mask each constrained row of ``logits_BV`` to its grammar's allowed tokens, in place (the scheduler passes
    its own stacked copy); unconstrained rows keep every token. No constrained row: nothing is done."""
    if all(c is None for c in constraints):
        return logits_BV
    bitmask_BW = torch.full((len(constraints), bitmask_width(logits_BV.shape[-1])), -1, dtype=torch.int32)
    for i, c in enumerate(constraints):
        if c is not None:
            c.fill(bitmask_BW[i])
    return apply_token_bitmask(logits_BV, bitmask_BW)
