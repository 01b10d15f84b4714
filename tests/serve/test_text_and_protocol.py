"""Chat templates, incremental detokenization with stop strings, and the app before the model is loaded."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serve_fixtures import TEXTS
from starlette.testclient import TestClient

from deepseek_moe.serve.app import AppState, build_app
from deepseek_moe.serve.protocol import MAX_DEPTH, ApiError, decode_body, parse_chat, parse_completion
from deepseek_moe.serve.text import DEFAULT_CHAT_TEMPLATE, ChatTemplate, IncrementalDetokenizer, TextAssembler
from deepseek_moe.train.tokenizer import train_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_the_checkpoints_chat_template_is_used_when_it_has_one(tmp_path: Path) -> None:
    # DeepSeek-V2-Chat's template shape: bos, "User: ...\n\n", "Assistant:" for the reply.
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
                "{% elif m['role'] == 'system' %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}Assistant:{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": {"content": "<｜begin▁of▁sentence｜>"}, "eos_token": "</s>"}))
    chat = ChatTemplate.for_checkpoint(tmp_path)
    assert not chat.is_default
    assert chat.render(MESSAGES) == "<｜begin▁of▁sentence｜>Be brief.\n\nUser: Hi\n\nAssistant:"


def test_without_a_template_the_plain_default_is_used(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    for path in (tmp_path, None):
        chat = ChatTemplate.for_checkpoint(path)
        assert chat.source == DEFAULT_CHAT_TEMPLATE
        assert chat.render(MESSAGES) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"


def test_the_default_templates_replies_end_with_the_token_generation_stops_on(tmp_path: Path) -> None:
    # What a fine-tune on chats rendered by it learns to end a reply with (the end-of-text token of config.json's
    # eos_token_id, else of the tokenizer), so that its generation stops there.
    history = [*MESSAGES, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    tok = train_tokenizer(["User: Hi\n\nAssistant: Hello."] * 5, 300)
    tok.add_special_tokens(["<|end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    for config, end in (({"eos_token_id": tok.token_to_id("<|endoftext|>")}, "<|endoftext|>"),
                        ({}, "<|endoftext|>"), ({"eos_token_id": [tok.token_to_id("<|end|>"), 0]}, "<|end|>")):
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert ChatTemplate.for_checkpoint(tmp_path).render(history) == (
            f"System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.{end}\n\nUser: Bye\n\nAssistant:")
    assert ChatTemplate.for_checkpoint(tmp_path, eos_token="</s>").render(history).count("Hello.</s>") == 1
    assert ChatTemplate.for_checkpoint(None).render(history).count("Hello.\n\n") == 1  # no tokenizer: no token


def test_text_is_released_per_token_without_broken_characters_or_stop_strings() -> None:
    tok = train_tokenizer(["plain ascii words and ✓ marks"] * 5, 300)
    ids = tok.encode("ab ✓ cd STOP ef").ids
    pieces = []
    text = TextAssembler(tok, None, frozenset())
    for t in ids:
        pieces.append(text.add(t))
    pieces.append(text.finish())
    assert "".join(pieces) == "ab ✓ cd STOP ef" and all("\ufffd" not in p for p in pieces)

    text = TextAssembler(tok, ["STOP", "never"], frozenset())
    out = ""
    for t in ids:
        out += text.add(t)
        if text.stopped:
            break
    out += text.finish()
    assert out == "ab ✓ cd " and text.stopped


def test_request_parsing_accepts_client_defaults_and_names_bad_fields() -> None:
    req = parse_completion({"model": "m", "prompt": ["hi"], "n": 1, "logprobs": None, "echo": False, "user": "u",
                            "presence_penalty": 0, "frequency_penalty": 0.0, "stream": True,
                            "stream_options": {"include_usage": True}, "top_k": -1, "stop": "x"})
    assert req.prompt_text == "hi" and req.include_usage and req.top_k is None and req.stop == ["x"]
    chat = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}],
                       "max_completion_tokens": 5, "logprobs": False})
    assert chat.messages == [{"role": "user", "content": "ab"}] and chat.max_tokens == 5
    for body, param in (({"prompt": "x", "n": 17}, "n"), ({"prompt": "x", "top_p": 1.5}, "top_p"),
                        ({"prompt": "x", "temperature": float("nan")}, "temperature")):
        try:
            parse_completion(body)
        except ApiError as e:
            assert e.status == 400 and e.param == param and e.body()["error"]["param"] == param
        else:
            raise AssertionError(f"{body} was accepted")


def test_before_loading_health_is_503_and_requests_are_refused() -> None:
    state = AppState()
    with TestClient(build_app(state)) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        state.load_error = "CheckpointError: broken"
        assert client.get("/health").json()["status"] == "failed"


# --- edge validation: every number range-checked, JSON's extras refused, each error naming the field -------------

def refused(parse: Any, body: Any) -> ApiError:
    try:
        parse(body)
    except ApiError as e:
        return e
    raise AssertionError(f"{body!r} was accepted")


def test_seed_must_fit_an_int64() -> None:
    for seed in (-(1 << 63), (1 << 63) - 1, 0, -1):
        assert parse_completion({"prompt": "x", "seed": seed}).seed == seed
    for seed in (1 << 63, 1 << 64, -(1 << 63) - 1, 10**30, 1.5, 1.0, True, "1"):
        e = refused(parse_completion, {"prompt": "x", "seed": seed})
        assert e.status == 400 and e.param == "seed", seed


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -0.1), ("temperature", 2.5), ("temperature", True), ("top_p", 0), ("top_p", 1.01),
    ("presence_penalty", 0.5), ("presence_penalty", 3), ("frequency_penalty", "0"), ("frequency_penalty", -2.5),
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 2.0), ("top_k", 0), ("top_k", -2), ("top_k", 1.5),
    ("n", 17), ("n", 10**6), ("n", 0), ("n", 1.0), ("n", True), ("logprobs", 21), ("logprobs", -1), ("logprobs", True), ("best_of", 3),
    ("stop", ["a"] * 5), ("stop", ["x" * 513]), ("stop", [""]), ("stop", 7), ("stream", 1), ("user", 5),
    ("logit_bias", {"1": 5}), ("echo", 1),
])
def test_each_bad_number_or_type_names_its_field(field: str, value: Any) -> None:
    e = refused(parse_completion, {"prompt": "x", field: value})
    assert e.status == 400 and e.param == field and field in e.message


def test_chat_only_fields_and_stream_options_are_checked() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    for field, value in (("top_logprobs", 3), ("max_completion_tokens", 0), ("tools", [{}])):
        assert refused(parse_chat, {"messages": msgs, field: value}).param == field
    e = refused(parse_chat, {"messages": msgs, "stream": True, "stream_options": {"continuous_usage_stats": "y"}})
    assert e.param == "stream_options.continuous_usage_stats"
    req = parse_chat({"messages": msgs, "stream": True, "stream_options": {"continuous_usage_stats": True}})
    assert req.continuous_usage and not req.include_usage
    assert refused(parse_chat, {"messages": [{"role": "tool", "content": "x"}]}).param == "messages[0].role"
    assert refused(parse_chat, {"messages": [{"role": "user", "content": "x", "name": 5}]}).param == \
        "messages[0].name"
    assert refused(parse_completion, {"prompt": "x", "max_token": 5}).param == "max_token"  # unknown: a 400


def test_max_tokens_zero_says_it_needs_echo() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    for parse, body, field in ((parse_completion, {"prompt": "x"}, "max_tokens"),
                               (parse_chat, {"messages": msgs}, "max_tokens"),
                               (parse_chat, {"messages": msgs}, "max_completion_tokens")):
        e = refused(parse, {**body, field: 0})
        assert e.status == 400 and e.param == field, e.message
        assert "must be >= 1, got 0" in e.message and "only with echo" in e.message and "completions" in e.message
    e = refused(parse_completion, {"prompt": "x", "max_tokens": -1})  # below 0, echo would not help
    assert "must be >= 1, got -1" in e.message and "echo" not in e.message
    e = refused(parse_completion, {"prompt": "x", "max_tokens": -1, "echo": True})
    assert "must be >= 0, got -1" in e.message
    assert parse_completion({"prompt": "x", "max_tokens": 0, "echo": True}).max_tokens == 0


@pytest.mark.parametrize(("raw", "param"), [
    (b'{"prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"prompt": "x", "top_p": Infinity}', "top_p"),
    (b'{"prompt": "x", "seed": -Infinity}', "seed"),
    (b'{"prompt": "x", "temperature": 1e400}', "temperature"),  # a float literal beyond float range
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, NaN]}]}', "messages[0].content[1]"),
    (b'{"prompt": "\\ud800"}', "prompt"),
    (b'{"prompt": "ok", "stop": ["a\\udfffb"]}', "stop[0]"),
    (b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', "messages[0].content"),
])
def test_json_extras_are_refused_with_the_path_to_the_value(raw: bytes, param: str) -> None:
    e = refused(decode_body, raw)
    assert e.status == 400 and e.param == param and param in e.message


def test_bodies_that_break_parsers_are_400s() -> None:
    for raw in (b"[" * 100_000 + b"]" * 100_000,  # RecursionError inside json
                b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}",  # parses, but deeper than MAX_DEPTH
                b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",  # past Python's int-from-string limit
                b'{"prompt": "caf\xe9"}', b'{"prompt": ', b""):
        e = refused(decode_body, raw)
        assert e.status == 400 and e.code in ("invalid_json", "invalid_utf8"), raw[:20]
    assert decode_body(b'{"a": ' + b"[" * (MAX_DEPTH - 2) + b"]" * (MAX_DEPTH - 2) + b"}")  # deep enough is fine
    assert decode_body('{"prompt": "héllo ✓ 漢字 \\ud83d\\ude00"}'.encode()) == {"prompt": "héllo ✓ 漢字 😀"}


# --- incremental detokenization: equal to decoding all at once, a bounded window per token ----------------------

class CountingTokenizer:
    """A tokenizer that records the length of every id list it decodes."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.lengths = tokenizer, []  # type: list[int]
        self.get_added_tokens_decoder = tokenizer.get_added_tokens_decoder

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))


@functools.cache
def byte_level_tokenizer() -> Any:
    return train_tokenizer(TEXTS, 400)


@functools.cache
def metaspace_tokenizer() -> Any:
    """SentencePiece-style: its decoder turns "▁" into spaces and strips the first one, so decoding a suffix of
    the ids on its own loses a space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"]))
    return tok


def streamed(tokenizer: Any, ids: list[int]) -> str:
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids] + [detok.finish()]
    return "".join(pieces)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 399), max_size=60))
def test_streamed_text_equals_decoding_all_at_once_on_random_tokens(ids: list[int]) -> None:
    tok = byte_level_tokenizer()  # random ids: many lone bytes of multi-byte characters, invalid UTF-8
    assert streamed(tok, ids) == tok.decode(ids).removesuffix("\ufffd")


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab ✓漢字éü😀\n.,"), max_size=40) | st.text(max_size=30))
def test_streamed_text_equals_decoding_all_at_once_on_multibyte_text(text: str) -> None:
    text = text.encode("utf-8", "replace").decode()  # st.text may hold surrogates
    for tok in (byte_level_tokenizer(), metaspace_tokenizer()):
        ids = tok.encode(text).ids
        assert streamed(tok, ids) == tok.decode(ids).removesuffix("\ufffd")


def test_each_token_decodes_a_bounded_window() -> None:
    base = byte_level_tokenizer()
    ids = base.encode("".join(TEXTS) * 2).ids
    # Lone lead bytes of multi-byte characters: each decodes alone to U+FFFD, and in a row they never complete.
    leads = [t for t in range(base.get_vocab_size()) if base.id_to_token(t) in ("Ã", "â", "ð")]
    garbage = leads * 40
    assert len(leads) == 3
    for sequence in (ids, garbage + ids[:50]):
        tok = CountingTokenizer(base)
        assert streamed(tok, sequence) == base.decode(sequence).removesuffix("\ufffd")
        per_token = len(tok.lengths) / len(sequence)
        assert max(tok.lengths) <= 2 * IncrementalDetokenizer.MAX_WINDOW + 2 and per_token <= 4, \
            (max(tok.lengths), per_token)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 399), min_size=1, max_size=50), st.lists(
    st.text(alphabet=st.sampled_from("abe ✓\n\ufffd"), min_size=1, max_size=4), min_size=1, max_size=4))
def test_stop_strings_cut_at_the_earliest_match(ids: list[int], stop: list[str]) -> None:
    tok = byte_level_tokenizer()
    full = tok.decode(ids).removesuffix("\ufffd")
    found = [i for i in (full.find(s) for s in stop) if i >= 0]
    text = TextAssembler(tok, stop, frozenset())
    out = ""
    for t in ids:
        out += text.add(t)
        if text.stopped:
            break
    out += text.finish()
    assert out == (full[:min(found)] if found else full) and text.stopped == bool(found)


class LoopWatchingTokenizer:
    """Passes calls through to a tokenizer, noting each encode/decode made on a thread running an event loop."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.calls: dict[str, int] = {"encode": 0, "decode": 0}
        self.on_loop: list[str] = []

    def _note(self, name: str) -> None:
        import asyncio

        self.calls[name] += 1
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self.on_loop.append(name)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        self._note("encode")
        return self.tokenizer.encode(*args, **kwargs)

    def encode_batch(self, *args: Any, **kwargs: Any) -> Any:
        self._note("encode")
        return self.tokenizer.encode_batch(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        self._note("decode")
        return self.tokenizer.decode(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def test_tokenizing_and_detokenizing_happen_off_the_event_loop(tmp_path: Path) -> None:
    from serve_fixtures import build_checkpoint

    from deepseek_moe.serve.server import load_served_model

    served = load_served_model(build_checkpoint(tmp_path / "tiny"), name="tiny")
    watcher = LoopWatchingTokenizer(served.tokenizer)
    served.tokenizer = watcher
    state = AppState()
    state.served = served
    try:
        with TestClient(build_app(state)) as client:
            body = {"prompt": "héllo wörld ✓ " * 5, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            assert client.post("/v1/completions", json=body).status_code == 200
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi ✓"}],
                                                         "max_tokens": 8, "stream": True, "stop": ["zz"]})
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
            assert client.post("/v1/completions", json={**body, "prompt": "x" * 100_000}).status_code == 400
    finally:
        served.scheduler.shutdown(timeout=0)
    assert watcher.calls["encode"] == 3 and watcher.calls["decode"] >= 8
    assert watcher.on_loop == []
