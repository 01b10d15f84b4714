"""Chat templates, incremental detokenization with stop strings, and the app before the model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

from starlette.testclient import TestClient

from deepseek_moe.serve.app import AppState, build_app
from deepseek_moe.serve.protocol import ApiError, parse_chat, parse_completion
from deepseek_moe.serve.text import DEFAULT_CHAT_TEMPLATE, ChatTemplate, TextAssembler
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
    for body, param in (({"prompt": "x", "n": 3}, "n"), ({"prompt": "x", "top_p": 1.5}, "top_p"),
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
