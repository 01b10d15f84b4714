"""serve/generation.py: a request's choices answered as one response or one stream, driven here without HTTP
(``stream`` over a connection stub) so that a stream that never ends fails the test instead of hanging it."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from serve_fixtures import EOS_ID, TEXTS, tiny_config

from deepseek_moe import DeepSeekMoEForCausalLM
from deepseek_moe.serve.app import ServedModel, choice_params, prepare
from deepseek_moe.serve.generation import Generation, stream, submit
from deepseek_moe.serve.protocol import parse_completion
from deepseek_moe.serve.scheduler import Scheduler, SchedulerConfig, TokenEvent
from deepseek_moe.serve.text import ChatTemplate
from deepseek_moe.train.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def served() -> Any:
    tokenizer = train_tokenizer(TEXTS, 400)
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(tiny_config(tokenizer.get_vocab_size())).eval()
    s = Scheduler(model, SchedulerConfig(max_batch_size=4, block_size=4))
    s.start()
    yield ServedModel(name="tiny", scheduler=s, tokenizer=tokenizer, chat_template=ChatTemplate.for_checkpoint(None),
                      stop_token_ids=frozenset({EOS_ID}))
    s.shutdown(timeout=5)


class Connected:
    """A client connection that stays open (``stream``'s disconnect watcher waits on it forever)."""

    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def stream_chunks(served: ServedModel, body: dict[str, Any]) -> list[Any]:
    """The SSE payloads of a streamed completion (JSON objects, then "[DONE]"); fails after 60 s."""
    async def main() -> list[bytes]:
        text_pool = ThreadPoolExecutor(1)
        req, ids, params, adapter = prepare(served, json.dumps(body).encode(), parse_completion, False)
        gens: list[Generation] = []
        for i in range(req.n):
            gens.append(Generation(served, req, ids, choice_params(params, i), False, text_pool, None, adapter,
                                   index=i, id=gens[0].id if gens else None))
        submit(gens)
        out = [chunk async for chunk in stream(Connected(), gens)]  # type: ignore[arg-type]
        text_pool.shutdown()
        return out

    raw = asyncio.run(asyncio.wait_for(main(), timeout=60))
    payloads = [c.decode().removeprefix("data: ").strip() for c in raw]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def test_a_stream_whose_choice_breaks_ends_with_an_error_and_done(served: ServedModel,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """n = 2, streamed, and choice 1's text fails with an unexpected exception (a bug, not an ApiError): the stream
    must still end (an error chunk, then [DONE]) and the other choice be cancelled, not wait for choice 1 forever
    (each choice's pump caught ApiError alone: any other exception ended its task without a word)."""
    real = Generation._detokenize

    def broken(self: Generation, events: list[TokenEvent], last: bool) -> Any:
        if self.index == 1:
            raise RuntimeError("a detokenizer bug")
        return real(self, events, last)

    monkeypatch.setattr(Generation, "_detokenize", broken)
    chunks = stream_chunks(served, {"prompt": "The quick", "max_tokens": 200, "n": 2, "stream": True,
                                    "ignore_eos": True})
    assert chunks[-1] == "[DONE]"
    error = chunks[-2]["error"]
    assert error["type"] == "server_error" and "a detokenizer bug" in error["message"]
    assert all(c["choices"][0]["index"] == 0 for c in chunks[:-2])  # choice 1 sent nothing
    deadline = time.monotonic() + 5
    while served.scheduler.has_work() and time.monotonic() < deadline:  # choice 0 cancelled, not left to run
        time.sleep(0.05)
    assert not served.scheduler.has_work()
    assert served.scheduler.pool.free_blocks == served.scheduler.pool.capacity_blocks
