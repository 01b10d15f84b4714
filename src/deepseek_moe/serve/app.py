"""The HTTP layer: OpenAI wire format in, scheduler calls out. It holds no batching logic.

Each generation request is read (at most ``max_body_bytes``), then parsed, validated (``protocol``) and tokenized
(``text``) on a worker thread, submitted to the scheduler, and then fed by the scheduler's events through an
asyncio queue: collected into one JSON response, or sent as server-sent events, one chunk per token, ending with
``data: [DONE]``. Tokens become text on the worker thread too, a batch of queued events at a time, so neither a
4 MB prompt nor a long output holds up the event loop (and with it every other client). A watcher on the
connection cancels the request when the client goes away, so its batch row and cache blocks are freed at the
next step.

``GET /`` is a chat page (``static/``) that streams from the chat endpoint and polls ``GET /stats`` for a
heatmap of the routed tokens per layer and expert over a sliding window, and the batch, queue and cache gauges.

Streaming and usage, as OpenAI does: chunks carry no ``usage`` unless ``stream_options.include_usage`` asks for a
last chunk with usage and no choices; ``stream_options.continuous_usage_stats`` (vLLM's) puts the usage so far on
every chunk.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from deepseek_moe.serve.metrics import LOAD_WINDOW_S, MAX_LOAD_WINDOW_S
from deepseek_moe.serve.protocol import (
    MAX_BODY_BYTES,
    ApiError,
    GenerationRequest,
    bad,
    decode_body,
    parse_chat,
    parse_completion,
)
from deepseek_moe.serve.scheduler import (
    Event,
    FinishEvent,
    QueueFullError,
    Request,
    SamplingParams,
    Scheduler,
    SchedulerStoppedError,
    TokenEvent,
)
from deepseek_moe.serve.structured import Constraint, FormatError, GrammarCompiler
from deepseek_moe.serve.text import ChatTemplate, TextAssembler, TokenBytes

TEXT_THREADS = 2  # parsing, tokenizing and detokenizing; the tokenizer releases the GIL while it works
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
RETRY_AFTER_S = 1
STATIC = Path(__file__).parent / "static"  # the chat page GET / serves (package data: no build step, no CDN)


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


class AppState:
    """Filled in once loading finishes; until then the endpoints answer 503 and /health says "loading"."""

    def __init__(self) -> None:
        self.served: ServedModel | None = None
        self.load_error: str | None = None

    def get(self) -> ServedModel:
        if self.served is None:
            raise ApiError(503, "the model is still loading" if self.load_error is None else
                           f"the model failed to load: {self.load_error}", headers={"Retry-After": "5"})
        return self.served


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _is_json(content_type: str | None) -> bool:
    """No Content-Type, or a JSON one; curl's -d sends form-urlencoded, refused with a hint."""
    if not content_type:
        return True
    kind = content_type.split(";")[0].strip().lower()
    return kind in ("application/json", "*/*", "") or kind.endswith("+json")


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The body's bytes, at most ``limit`` of them, of a JSON content type. An oversized body is read to its end
    (up to 16x the limit, and discarded) before answering, so the client sees the 413 rather than a reset while
    still sending."""
    content_type = request.headers.get("content-type")
    if not _is_json(content_type):
        raise ApiError(415, f"Content-Type {content_type!r} is not JSON; send the body as application/json "
                       "(curl: -H 'Content-Type: application/json')", param="Content-Type",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 16 * limit:
        raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > 16 * limit:
            break
    if size > limit:
        raise ApiError(413, f"the request body is {size}{'+' if size > 16 * limit else ''} bytes; the limit is "
                       f"{limit}", code="request_too_large")
    return b"".join(chunks)


def _check_model(served: ServedModel, req: GenerationRequest) -> str | None:
    """The adapter the request's ``model`` names; None for the base model (its name, or no name)."""
    if req.model is None or req.model == served.name:
        return None
    if req.model in served.adapters:
        return req.model
    known = ", ".join(f"`{n}`" for n in [served.name, *served.adapters])
    raise ApiError(404, f"The model `{req.model}` does not exist. This server serves {known}.", param="model",
                   code="model_not_found")


def _encode(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    """Token ids of ``text``. Through ``encode_batch``: the tokenizers library releases the GIL there and not in
    ``encode``, which held it (and so the event loop, though it ran on a worker thread) for the 2.2 s a 3.5 MB
    prompt takes."""
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is None:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
    return list(batch([text], add_special_tokens=add_special_tokens)[0].ids)


def _prompt_ids(served: ServedModel, req: GenerationRequest) -> tuple[list[int], str]:
    """Token ids of the prompt and the name of the field they came from."""
    if req.messages is not None:
        field_name = "messages"
        try:
            text = served.chat_template.render(req.messages)
        except Exception as e:  # the template's raise_exception, or a template that cannot handle the input
            raise bad("messages", f"the chat template refused them: {e}") from None
        ids = _encode(served.tokenizer, text, add_special_tokens=False)
    elif req.prompt_text is not None:
        field_name = "prompt"
        ids = _encode(served.tokenizer, req.prompt_text, add_special_tokens=True)
    else:
        field_name = "prompt"
        ids = list(req.prompt_ids or [])
        bad_ids = [t for t in ids if not 0 <= t < served.vocab_size]
        if bad_ids:
            raise bad("prompt", f"token id {bad_ids[0]} is outside the vocabulary [0, {served.vocab_size})")
    if not ids:
        raise bad(field_name, "encodes to no tokens")
    if len(ids) >= served.max_seq_len:
        raise bad(field_name, f"is {len(ids)} tokens; this model's context is {served.max_seq_len} tokens, which must "
                  "also hold at least one generated token", code="context_length_exceeded")
    return ids, field_name


def _sampling(served: ServedModel, req: GenerationRequest, n_prompt: int, chat: bool) -> SamplingParams:
    room = served.max_seq_len - n_prompt
    if req.max_tokens is None:
        max_tokens = room if chat else min(DEFAULT_COMPLETION_TOKENS, room)
    elif req.max_tokens > room:
        name = "max_tokens"
        raise bad(name, f"{req.max_tokens} tokens do not fit: the prompt is {n_prompt} tokens and the context "
                  f"{served.max_seq_len}, leaving {room}", code="context_length_exceeded")
    else:
        max_tokens = req.max_tokens
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          seed=req.seed, stop_token_ids=served.stop_token_ids, ignore_eos=req.ignore_eos,
                          logprobs=req.logprobs)


def compile_format(served: ServedModel, req: GenerationRequest) -> Constraint | None:
    """The request's structured-output constraint (None without one); a format that cannot be compiled is a 400
    naming its field. Compiling can take a while for a large schema, so it runs on a worker thread."""
    if req.output_format is None:
        return None
    try:
        return served.grammars.constraint(req.output_format)
    except FormatError as e:
        raise bad(e.param, e.message, code="unsupported_value") from None


def prepare(served: ServedModel, raw: bytes, parse: Callable[[Any], GenerationRequest], chat: bool
            ) -> tuple[GenerationRequest, list[int], SamplingParams, str | None]:
    """Everything between the body's bytes and a request the scheduler can take (its prompt, sampling and
    adapter); it runs on a worker thread."""
    req = parse(decode_body(raw))
    adapter = _check_model(served, req)
    ids, _ = _prompt_ids(served, req)
    return req, ids, _sampling(served, req, len(ids), chat), adapter


@dataclass(frozen=True)
class Logprob:
    """A generated token's text (decoded alone, special tokens by name: U+FFFD for part of a character) and
    bytes, its log-probability,
    and its top alternatives' (text, bytes, log-probability)."""

    token: str
    raw: bytes
    logprob: float
    top: list[tuple[str, bytes, float]]


class Generation:
    """One request in flight: its scheduler Request, the queue its events arrive on, and its text so far."""

    def __init__(self, served: ServedModel, req: GenerationRequest, ids: list[int], params: SamplingParams,
                 chat: bool, text_pool: ThreadPoolExecutor, constraint: Constraint | None = None,
                 adapter: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.served, self.req, self.chat, self.text_pool = served, req, chat, text_pool
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text = TextAssembler(served.tokenizer, req.stop, served.stop_token_ids)
        self.n_prompt, self.n_completion = len(ids), 0
        self.text_offset = 0  # completions' logprobs.text_offset: where the next token's text starts
        self.finished = False

        def sink(event: Event) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, event)

        self.request = Request(ids, params, sink, constraint=constraint, adapter=adapter)
        self.model_name = adapter or served.name

    def submit(self) -> None:
        try:
            self.served.scheduler.submit(self.request)
        except QueueFullError as e:
            raise ApiError(503, f"the server is busy: {e}; retry later", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except SchedulerStoppedError as e:
            raise ApiError(503, str(e), code="shutting_down") from None

    def cancel(self, reason: str = "cancelled") -> None:
        if not self.finished:
            self.finished = True
            self.served.scheduler.cancel(self.request.id, reason=reason)

    def _detokenize(self, events: list[TokenEvent], last: bool) -> tuple[list[str], list[Logprob | None]]:
        """Each token's text delta, stopping at a stop string (then the last delta holds what was held); with
        ``last``, one more entry with whatever is still held. Beside them, each token's Logprob (None unless
        the request asked for logprobs). Runs on a worker thread."""
        out: list[str] = []
        found: list[Logprob | None] = []
        for event in events:
            out.append(self.text.add(event.token))
            found.append(None if event.logprob is None else self._logprob(event))
            if self.text.stopped:
                return out, found
        if last:
            out.append(self.text.finish())
        return out, found

    def _logprob(self, event: TokenEvent) -> Logprob:
        raw = self.served.token_bytes

        def decode(token: int) -> str:  # special tokens by name, as OpenAI shows <|endoftext|>
            return str(self.served.tokenizer.decode([token], skip_special_tokens=False))
        return Logprob(decode(event.token), raw(event.token), event.logprob or 0.0,
                       [(decode(t), raw(t), lp) for t, lp in event.top_logprobs])

    async def deltas(self) -> AsyncIterator[tuple[str, str | None, Logprob | None]]:
        """(text delta, finish reason or None, the token's Logprob or None) per token, then a last one with the
        reason; raises ApiError when the request failed. Events that queued up meanwhile are detokenized in one
        go, off the loop."""
        loop = asyncio.get_running_loop()
        while True:
            events = [await self.queue.get()]
            while not self.queue.empty():
                events.append(self.queue.get_nowait())
            tokens = [e for e in events if isinstance(e, TokenEvent)]
            end = next((e for e in events if not isinstance(e, TokenEvent)), None)
            done = end is not None and end.reason in ("stop", "length")
            texts, found = await loop.run_in_executor(self.text_pool, self._detokenize, tokens, done) \
                if tokens or done else ([], [])
            stopped = self.text.stopped
            for k, delta in enumerate(texts[:len(tokens)]):
                self.n_completion += 1
                if stopped and k == len(texts) - 1:  # a stop string: retire the request in the scheduler
                    self.cancel("stop")
                    yield delta, "stop", found[k]
                    return
                yield delta, None, found[k]
            if end is None:
                continue
            self.finished = True
            if done:
                assert isinstance(end, FinishEvent)
                yield texts[-1] if len(texts) > len(tokens) else "", end.reason, None
                return
            if end.reason == "shutdown":
                raise ApiError(503, "the server shut down before this request finished", code="shutting_down")
            if end.reason == "cancelled":
                raise ApiError(499, "the request was cancelled", code="cancelled")
            if end.reason == "invalid":  # a parameter only the scheduler could judge (e.g. a seed)
                raise ApiError(400, end.error or "invalid request", param=end.param, code="invalid_request")
            raise ApiError(500, f"generation failed: {end.error}", code="generation_error")

    def timing_headers(self) -> dict[str, str]:
        """Server-side latencies of a non-streamed response, which its client cannot see: time to first token
        and time per output token after it (seconds)."""
        r = self.request
        if not r.output:
            return {}
        tpot = (r.last_token_time - r.first_token_time) / (len(r.output) - 1) if len(r.output) > 1 else 0.0
        return {"X-Time-To-First-Token": f"{r.first_token_time - r.arrival:.6f}",
                "X-Time-Per-Output-Token": f"{tpot:.6f}"}

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": self.n_completion,
                "total_tokens": self.n_prompt + self.n_completion}

    def choice(self, text: str, finish: str | None, *, stream: bool, logprobs: list[Logprob] | None = None,
               texts: list[str] | None = None) -> dict[str, Any]:
        """One choice; ``logprobs`` (with each token's own text delta in ``texts``, for completions' offsets)
        when the request asked for them."""
        wire = None if self.req.logprobs is None else self._wire_logprobs(logprobs or [], texts or [])
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": wire, "finish_reason": finish}
        if stream:
            return {"index": 0, "delta": {"content": text} if text or finish is None else {}, "logprobs": wire,
                    "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": wire,
                "finish_reason": finish}

    def _wire_logprobs(self, logprobs: list[Logprob], texts: list[str]) -> dict[str, Any]:
        """OpenAI's formats: chat's ``{content: [{token, logprob, bytes, top_logprobs}]}``, completions' legacy
        parallel lists (``tokens``, ``token_logprobs``, ``top_logprobs`` as {token: logprob} holding the chosen
        token too, ``text_offset`` into the completion's text, counted across a stream's chunks)."""
        if self.chat:
            def entry(token: str, raw: bytes, logprob: float) -> dict[str, Any]:
                return {"token": token, "logprob": logprob, "bytes": list(raw)}
            return {"content": [{**entry(lp.token, lp.raw, lp.logprob),
                                 "top_logprobs": [entry(*t) for t in lp.top]} for lp in logprobs]}
        offsets = []
        for delta in texts:
            offsets.append(self.text_offset)
            self.text_offset += len(delta)
        return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{**{t: v for t, _, v in lp.top}, lp.token: lp.logprob} for lp in logprobs], "text_offset": offsets}

    def envelope(self, choices: list[dict[str, Any]], *, stream: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name,
                "choices": choices}


async def _watch_disconnect(request: HttpRequest, gen: Generation) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gen.cancel()
            return


async def _collect(request: HttpRequest, gen: Generation) -> Response:
    watcher = asyncio.create_task(_watch_disconnect(request, gen))
    try:
        text: list[str] = []
        finish: str | None = None
        logprobs: list[Logprob] = []
        texts: list[str] = []  # the text of each token that has a Logprob
        async for delta, reason, logprob in gen.deltas():
            text.append(delta)
            finish = reason
            if logprob is not None:
                logprobs.append(logprob)
                texts.append(delta)
        body = gen.envelope([gen.choice("".join(text), finish, stream=False, logprobs=logprobs, texts=texts)],
                            stream=False)
        body["usage"] = gen.usage()
        return JSONResponse(body, headers=gen.timing_headers())
    finally:
        watcher.cancel()
        gen.cancel()


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _stream(request: HttpRequest, gen: Generation) -> AsyncIterator[bytes]:
    watcher = asyncio.create_task(_watch_disconnect(request, gen))
    continuous = gen.req.continuous_usage

    def chunk(choices: list[dict[str, Any]]) -> bytes:
        body = gen.envelope(choices, stream=True)
        if continuous:
            body["usage"] = gen.usage()
        return _sse(body)

    try:
        if gen.chat:  # the first chat chunk carries the role
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        try:
            async for delta, finish, logprob in gen.deltas():
                found = [] if logprob is None else [logprob]
                yield chunk([gen.choice(delta, finish, stream=True, logprobs=found, texts=[delta] * len(found))])
        except ApiError as e:
            yield _sse(e.body())
        else:
            if gen.req.include_usage:  # OpenAI's last chunk: no choices, the usage
                tail = gen.envelope([], stream=True)
                tail["usage"] = gen.usage()
                yield _sse(tail)
        yield _sse("[DONE]")
    finally:
        watcher.cancel()
        gen.cancel()


def _window_param(value: str | None) -> float:
    if value is None:
        return LOAD_WINDOW_S
    try:
        window = float(value)
    except ValueError:
        window = math.nan
    if not 0 < window <= MAX_LOAD_WINDOW_S:  # NaN fails too
        raise bad("window", f"must be a number of seconds in (0, {MAX_LOAD_WINDOW_S:g}], got {value!r}")
    return window


def live_stats(served: ServedModel, window: float) -> dict[str, Any]:
    """What ``GET /stats`` answers (the page polls it)."""
    scheduler = served.scheduler
    m = scheduler.metrics
    load, covered = m.expert_load_window(window)
    return {"model": served.name, "time": time.time(), "window_seconds": covered,
            "expert_tokens": {"layers": list(load), "n_experts": m.n_experts, "counts": list(load.values())},
            "running": int(m.running.value), "max_batch_size": scheduler.config.max_batch_size,
            "queue_depth": int(m.queue_depth.value), "kv_cache_blocks_used": int(m.kv_blocks_used.value),
            "kv_cache_blocks_total": scheduler.pool.capacity_blocks, "kv_cache_tokens": int(m.kv_tokens.value),
            "generation_tokens_total": int(m.generation_tokens.value),
            "prompt_tokens_total": int(m.prompt_tokens.value)}


def build_app(state: AppState, *, lifespan: Any = None, max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The Starlette app over ``state`` (whose ``served`` may be filled in later, by a loader)."""

    text_pool = ThreadPoolExecutor(TEXT_THREADS, thread_name_prefix="deepseek-moe-text")

    def endpoint(parse: Callable[[Any], GenerationRequest], chat: bool) -> Callable[[HttpRequest], Any]:
        async def handle(request: HttpRequest) -> Response:
            try:
                served = state.get()
                raw = await read_body(request, max_body_bytes)
                loop = asyncio.get_running_loop()
                req, ids, params, adapter = await loop.run_in_executor(text_pool, prepare, served, raw, parse, chat)
                constraint = None if req.output_format is None else \
                    await loop.run_in_executor(text_pool, compile_format, served, req)
                gen = Generation(served, req, ids, params, chat, text_pool, constraint, adapter)
                gen.submit()
            except ApiError as e:  # refused before it was queued
                if state.served is not None:
                    state.served.scheduler.metrics.requests_rejected.labels(status=str(e.status)).inc()
                return error_response(e)
            if req.stream:
                return StreamingResponse(_stream(request, gen), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            try:
                return await _collect(request, gen)
            except ApiError as e:
                return error_response(e)
        return handle

    async def models(request: HttpRequest) -> Response:
        try:
            served = state.get()
        except ApiError as e:
            return error_response(e)
        base = {"id": served.name, "object": "model", "created": served.created, "owned_by": "deepseek_moe",
                "max_model_len": served.max_seq_len}
        # Adapters as vLLM lists its LoRA modules: their own id, the base model as parent.
        return JSONResponse({"object": "list", "data": [base, *(
            {**base, "id": name, "parent": served.name} for name in served.adapters)]})

    async def health(request: HttpRequest) -> Response:
        served = state.served
        if served is not None and served.scheduler.is_running:
            return JSONResponse({"status": "ok", "model": served.name})
        status = "failed" if state.load_error else ("stopped" if served is not None else "loading")
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    async def metrics(request: HttpRequest) -> Response:
        if state.served is None:
            return PlainTextResponse("", status_code=503)
        return PlainTextResponse(state.served.scheduler.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def stats(request: HttpRequest) -> Response:
        """The page's live numbers as JSON: routed tokens per MoE layer and expert over a sliding window
        (``?window=`` seconds, default 10), the batch, queue and cache gauges, and the token counters."""
        try:
            served = state.get()
            window = _window_param(request.query_params.get("window"))
        except ApiError as e:
            return error_response(e)
        return JSONResponse(live_stats(served, window))

    async def page(request: HttpRequest) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def http_error(request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    async def server_error(request: HttpRequest, exc: Exception) -> Response:
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    routes = [
        Route("/v1/completions", endpoint(parse_completion, chat=False), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(parse_chat, chat=True), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
        Route("/", page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})
