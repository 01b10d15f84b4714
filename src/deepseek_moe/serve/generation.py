"""One request in flight and its answer: a ``Generation`` per choice (``n`` > 1 asks for several, forked from one
prompt in the scheduler), fed by the scheduler's events through an asyncio queue and turned into text on a worker
thread, then ``collect``-ed into one JSON response or ``stream``-ed as server-sent events, one chunk per token of
any choice (each chunk names its choice's ``index``), ending with ``data: [DONE]``. A watcher on the connection
cancels every choice when the client goes away, so their batch rows and cache blocks are freed at the next step.

Usage counts the prompt once and the tokens of every choice, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

from deepseek_moe.serve.protocol import ApiError, GenerationRequest
from deepseek_moe.serve.scheduler import (
    Event,
    FinishEvent,
    QueueFullError,
    Request,
    SamplingParams,
    SchedulerStoppedError,
    TokenEvent,
)
from deepseek_moe.serve.served import ServedModel
from deepseek_moe.serve.structured import Constraint
from deepseek_moe.serve.text import TextAssembler

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Logprob:
    """A generated token's text (decoded alone, special tokens by name: U+FFFD for part of a character) and
    bytes, its log-probability,
    and its top alternatives' (text, bytes, log-probability)."""

    token: str
    raw: bytes
    logprob: float | None  # None: a prompt's first token (echo), which nothing predicts
    top: list[tuple[str, bytes, float]] | None


# A choice's next piece: its text, the finish reason (None until the last), the Logprobs of its tokens (when asked
# for) and each one's own text, for completions' text_offset.
Delta = tuple[str, str | None, list[Logprob], list[str]]


class Generation:
    """One choice of a request in flight: its scheduler Request, the queue its events arrive on, and its text so
    far. ``index``: the choice's place among the request's ``n``; ``id``: the response's, shared by its choices."""

    def __init__(self, served: ServedModel, req: GenerationRequest, ids: list[int], params: SamplingParams,
                 chat: bool, text_pool: ThreadPoolExecutor, constraint: Constraint | None = None,
                 adapter: str | None = None, *, index: int = 0, id: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.served, self.req, self.chat, self.text_pool = served, req, chat, text_pool
        self.id = id or ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.index = index
        self.created = int(time.time())
        self.text = TextAssembler(served.tokenizer, req.stop, served.stop_token_ids)
        self.n_prompt, self.n_completion = len(ids), 0
        self.text_offset = 0  # completions' logprobs.text_offset: where the next token's text starts
        self.finished = False
        self.echo = req.echo  # the prompt is still to be sent before the completion

        def sink(event: Event) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, event)

        self.request = Request(ids, params, sink, constraint=constraint, adapter=adapter)
        self.model_name = adapter or served.name

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
            found.append(None if event.logprob is None else
                         self._logprob(event.token, event.logprob, event.top_logprobs))
            if self.text.stopped:
                return out, found
        if last:
            out.append(self.text.finish())
        return out, found

    def _logprob(self, token: int, logprob: float | None, top: tuple[tuple[int, float], ...] | None) -> Logprob:
        raw = self.served.token_bytes

        def decode(token: int) -> str:  # special tokens by name, as OpenAI shows <|endoftext|>
            return str(self.served.tokenizer.decode([token], skip_special_tokens=False))
        return Logprob(decode(token), raw(token), logprob,
                       None if top is None else [(decode(t), raw(t), lp) for t, lp in top])

    def _echo(self) -> Delta:
        """The prompt, which OpenAI's ``echo`` puts before the completion: its text (as sent, or decoded from the
        token ids sent), and with logprobs each prompt token's Logprob (the first has none: nothing comes before
        it) beside its own text (for the offsets). Runs on a worker thread."""
        ids = list(self.request.prompt)
        text = TextAssembler(self.served.tokenizer, None, self.served.stop_token_ids)
        pieces = [text.add(t) for t in ids]
        pieces[-1] += text.finish()
        whole = "".join(pieces) if self.req.prompt_text is None else self.req.prompt_text
        if self.req.logprobs is None:
            return whole, None, [], []
        found = [self._logprob(ids[0], None, None)]
        found += [self._logprob(t, lp, top) for t, (lp, top) in zip(ids[1:], self.request.prompt_logprobs,
                                                                     strict=True)]
        return whole, None, found, pieces

    async def deltas(self) -> AsyncIterator[Delta]:
        """(text delta, finish reason or None, the Logprobs and texts of its tokens) per token (with ``echo``, the
        prompt first, as one delta), then a last one with the reason; raises ApiError when the request failed.
        Events that queued up meanwhile are detokenized in one go, off the loop."""
        loop = asyncio.get_running_loop()
        while True:
            events = [await self.queue.get()]
            while not self.queue.empty():
                events.append(self.queue.get_nowait())
            tokens = [e for e in events if isinstance(e, TokenEvent)]
            end = next((e for e in events if not isinstance(e, TokenEvent)), None)
            done = end is not None and end.reason in ("stop", "length")
            if self.echo and (tokens or done):  # the prompt's logprobs are complete before its first event
                self.echo = False
                yield await loop.run_in_executor(self.text_pool, self._echo)
            texts, found = await loop.run_in_executor(self.text_pool, self._detokenize, tokens, done) \
                if tokens or done else ([], [])
            stopped = self.text.stopped
            for k, delta in enumerate(texts[:len(tokens)]):
                self.n_completion += 1
                lp = found[k]
                if stopped and k == len(texts) - 1:  # a stop string: retire the request in the scheduler
                    self.cancel("stop")
                    yield delta, "stop", [] if lp is None else [lp], [] if lp is None else [delta]
                    return
                yield delta, None, [] if lp is None else [lp], [] if lp is None else [delta]
            if end is None:
                continue
            self.finished = True
            if done:
                assert isinstance(end, FinishEvent)
                yield texts[-1] if len(texts) > len(tokens) else "", end.reason, [], []
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

    def choice(self, text: str, finish: str | None, *, stream: bool, logprobs: list[Logprob] | None = None,
               texts: list[str] | None = None) -> dict[str, Any]:
        """One choice; ``logprobs`` (with each token's own text delta in ``texts``, for completions' offsets)
        when the request asked for them."""
        wire = None if self.req.logprobs is None else self._wire_logprobs(logprobs or [], texts or [])
        if not self.chat:
            return {"index": self.index, "text": text, "logprobs": wire, "finish_reason": finish}
        if stream:
            return {"index": self.index, "delta": {"content": text} if text or finish is None else {}, "logprobs": wire,
                    "finish_reason": finish}
        return {"index": self.index, "message": {"role": "assistant", "content": text}, "logprobs": wire,
                "finish_reason": finish}

    def _wire_logprobs(self, logprobs: list[Logprob], texts: list[str]) -> dict[str, Any]:
        """OpenAI's formats: chat's ``{content: [{token, logprob, bytes, top_logprobs}]}``, completions' legacy
        parallel lists (``tokens``, ``token_logprobs``, ``top_logprobs`` as {token: logprob} holding the chosen
        token too, ``text_offset`` into the completion's text, counted across a stream's chunks)."""
        if self.chat:
            def entry(token: str, raw: bytes, logprob: float | None) -> dict[str, Any]:
                return {"token": token, "logprob": logprob, "bytes": list(raw)}
            return {"content": [{**entry(lp.token, lp.raw, lp.logprob),
                                 "top_logprobs": [entry(*t) for t in lp.top or []]} for lp in logprobs]}
        offsets = []
        for delta in texts:
            offsets.append(self.text_offset)
            self.text_offset += len(delta)
        return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [None if lp.top is None else {**{t: v for t, _, v in lp.top}, lp.token: lp.logprob}
                                 for lp in logprobs], "text_offset": offsets}

    def envelope(self, choices: list[dict[str, Any]], *, stream: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name,
                "choices": choices}


def submit(gens: list[Generation]) -> None:
    """Queue a request's choices: the first as the request, the others as its forks (``Scheduler.submit``)."""
    try:
        gens[0].served.scheduler.submit(gens[0].request, forks=[g.request for g in gens[1:]])
    except QueueFullError as e:
        raise ApiError(503, f"the server is busy: {e}; retry later", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except SchedulerStoppedError as e:
        raise ApiError(503, str(e), code="shutting_down") from None


def usage(gens: list[Generation]) -> dict[str, int]:
    """The prompt once, the completion tokens of every choice."""
    prompt, completion = gens[0].n_prompt, sum(g.n_completion for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def cancel_all(gens: list[Generation]) -> None:
    for g in gens:
        g.cancel()


def _first_error(errors: list[BaseException]) -> BaseException:
    """The error to answer with when choices failed: one that is not the cancellation the others got from it."""
    return next((e for e in errors if not (isinstance(e, ApiError) and e.status == 499)), errors[0])


async def _watch_disconnect(request: HttpRequest, gens: list[Generation]) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel_all(gens)
            return


async def collect(request: HttpRequest, gens: list[Generation]) -> Response:
    """Every choice's whole text in one JSON response; a choice that fails cancels the others."""
    watcher = asyncio.create_task(_watch_disconnect(request, gens))

    async def one(gen: Generation) -> dict[str, Any]:
        text: list[str] = []
        finish: str | None = None
        logprobs: list[Logprob] = []
        texts: list[str] = []  # the text of each token that has a Logprob
        try:
            async for delta, reason, found, pieces in gen.deltas():
                text.append(delta)
                finish = reason
                logprobs += found
                texts += pieces
        except ApiError:
            cancel_all(gens)
            raise
        return gen.choice("".join(text), finish, stream=False, logprobs=logprobs, texts=texts)

    try:
        results = await asyncio.gather(*(one(g) for g in gens), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise _first_error(errors)
        body = gens[0].envelope([r for r in results if isinstance(r, dict)], stream=False)
        body["usage"] = usage(gens)
        return JSONResponse(body, headers=gens[0].timing_headers())
    finally:
        watcher.cancel()
        cancel_all(gens)


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def stream(request: HttpRequest, gens: list[Generation]) -> AsyncIterator[bytes]:
    """Server-sent events: a chunk per token of any choice, in the order they come; a choice that fails ends the
    stream with its error (the others are cancelled)."""
    watcher = asyncio.create_task(_watch_disconnect(request, gens))
    first = gens[0]
    arrived: asyncio.Queue[tuple[Generation, Delta | None, ApiError | None]] = asyncio.Queue()

    async def pump(gen: Generation) -> None:
        try:
            async for item in gen.deltas():
                arrived.put_nowait((gen, item, None))
        except ApiError as e:
            arrived.put_nowait((gen, None, e))
            return
        except Exception as e:  # a bug: end the stream with it, or the loop below would wait for this choice forever
            arrived.put_nowait((gen, None, ApiError(500, f"generation failed: {type(e).__name__}: {e}",
                                                    code="generation_error")))
            return
        arrived.put_nowait((gen, None, None))  # this choice is done

    def chunk(choices: list[dict[str, Any]]) -> bytes:
        body = first.envelope(choices, stream=True)
        if first.req.continuous_usage:
            body["usage"] = usage(gens)
        return _sse(body)

    pumps = [asyncio.create_task(pump(g)) for g in gens]
    try:
        if first.chat:  # each choice's first chat chunk carries the role
            for g in gens:
                yield chunk([{"index": g.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        left, error = len(gens), None
        while left:
            gen, item, error = await arrived.get()
            if error is not None:
                break
            if item is None:
                left -= 1
                continue
            delta, finish, found, pieces = item
            yield chunk([gen.choice(delta, finish, stream=True, logprobs=found, texts=pieces)])
        if error is not None:
            cancel_all(gens)
            yield _sse(error.body())
        elif first.req.include_usage:  # OpenAI's last chunk: no choices, the usage
            tail = first.envelope([], stream=True)
            tail["usage"] = usage(gens)
            yield _sse(tail)
        yield _sse("[DONE]")
    finally:
        watcher.cancel()
        for p in pumps:
            p.cancel()
        cancel_all(gens)
