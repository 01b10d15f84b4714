"""The HTTP layer: OpenAI wire format in, scheduler calls out. It holds no batching logic.

Each generation request is read (at most ``max_body_bytes``), then parsed, validated (``protocol``) and tokenized
(``text``) on a worker thread, submitted to the scheduler (``n`` choices: one request and its forks), and then
answered by ``generation``: each choice fed by the scheduler's events through an asyncio queue, collected into one
JSON response or sent as server-sent events, one chunk per token, ending with ``data: [DONE]``. Tokens become text
on the worker thread too, a batch of queued events at a time, so neither a 4 MB prompt nor a long output holds up
the event loop (and with it every other client). A watcher on the connection cancels the request when the client
goes away, so its batch rows and cache blocks are freed at the next step.

``GET /`` is a chat page (``static/``) that streams from the chat endpoint and polls ``GET /stats`` for a
heatmap of the routed tokens per layer and expert over a sliding window, and the batch, queue and cache gauges.

Streaming and usage, as OpenAI does: chunks carry no ``usage`` unless ``stream_options.include_usage`` asks for a
last chunk with usage and no choices; ``stream_options.continuous_usage_stats`` (vLLM's) puts the usage so far on
every chunk.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from deepseek_moe.serve.generation import Generation, collect, stream, submit
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
from deepseek_moe.serve.scheduler import SamplingParams

# ServedModel lives in served.py (generation.py needs it too); callers import it from here.
from deepseek_moe.serve.served import ServedModel as ServedModel
from deepseek_moe.serve.structured import Constraint, FormatError

TEXT_THREADS = 2  # parsing, tokenizing and detokenizing; the tokenizer releases the GIL while it works
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
STATIC = Path(__file__).parent / "static"  # the chat page GET / serves (package data: no build step, no CDN)


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
                          logprobs=req.logprobs, prompt_logprobs=req.logprobs if req.echo else None)


def compile_format(served: ServedModel, req: GenerationRequest) -> list[Constraint | None]:
    """The request's structured-output constraint for each of its ``n`` choices (each follows its grammar in its
    own state; None without a format); a format that cannot be compiled is a 400 naming its field. Compiling
    can take a while for a large schema, so it runs on a worker thread, once per request: the other choices
    start from copies of the compiled state (n=16 would otherwise pay the compile and its probe 16 times)."""
    if req.output_format is None:
        return [None] * req.n
    try:
        first = served.grammars.constraint(req.output_format)
    except FormatError as e:
        raise bad(e.param, e.message, code="unsupported_value") from None
    return [first, *(first.copy() for _ in range(req.n - 1))]


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice ``index``'s sampling: the request's, seeded with ``seed + index`` (as vLLM seeds its choices), so a
    request with a seed is reproducible choice by choice, and its choices differ."""
    return params if params.seed is None or index == 0 else replace(params, seed=params.seed + index)


def prepare(served: ServedModel, raw: bytes, parse: Callable[[Any], GenerationRequest], chat: bool
            ) -> tuple[GenerationRequest, list[int], SamplingParams, str | None]:
    """Everything between the body's bytes and a request the scheduler can take (its prompt, sampling and
    adapter); it runs on a worker thread."""
    req = parse(decode_body(raw))
    adapter = _check_model(served, req)
    rows = served.scheduler.config.max_batch_size
    if req.n > rows:
        raise bad("n", f"{req.n} choices do not fit this server's batch of {rows} rows (each choice takes one)")
    ids, _ = _prompt_ids(served, req)
    return req, ids, _sampling(served, req, len(ids), chat), adapter


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
                constraints = [None] * req.n if req.output_format is None else \
                    await loop.run_in_executor(text_pool, compile_format, served, req)
                gens: list[Generation] = []
                for i, constraint in enumerate(constraints):
                    gens.append(Generation(served, req, ids, choice_params(params, i), chat, text_pool, constraint,
                                           adapter, index=i, id=gens[0].id if gens else None))
                submit(gens)
            except ApiError as e:  # refused before it was queued
                if state.served is not None:
                    state.served.scheduler.metrics.requests_rejected.labels(status=str(e.status)).inc()
                return error_response(e)
            if req.stream:
                return StreamingResponse(stream(request, gens), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            try:
                return await collect(request, gens)
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
