"""examples/data/format_chats.jsonl: the file its script writes, every line a one-turn chat finetune reads whose
reply is ``{"answer": ...}``, and rendered as the default run (a BASE with no tokenizer_config.json) renders it:
the plain default template, with the loss on exactly the replies and the eos token that ends each (the token
generate stops on)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from deepseek_moe.cli.generate_cmd import chat_prompt
from deepseek_moe.finetune.data import ChatRenderer, Tokenise, examples, read_records

pytest.importorskip("jinja2", reason="chat templates render with jinja2 (the serve extra)")

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
FILE = DATA / "format_chats.jsonl"


@pytest.fixture(scope="module")
def make():
    spec = importlib.util.spec_from_file_location("make_format_chats", DATA / "make_format_chats.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_format_chats"] = module
    spec.loader.exec_module(module)
    return module


def test_the_file_is_what_its_script_writes(make):
    assert FILE.read_text(encoding="utf-8") == make.render(make.chats())


def test_every_line_is_a_one_turn_chat_in_the_format():
    lines = FILE.read_text(encoding="utf-8").splitlines()
    assert 50 <= len(lines) <= 200
    records = list(read_records((str(FILE),), strict=True))
    assert len(records) == len(lines) and {r.kind for r in records} == {"messages"}
    for r in records:
        user, reply = r.value
        assert user["role"] == "user" and reply["role"] == "assistant"
        answer = json.loads(reply["content"])  # the frame: a JSON object with one key
        assert list(answer) == ["answer"] and re.fullmatch(r"\w+", answer["answer"]), r.where
        assert reply["content"] == '{"answer": "' + answer["answer"] + '"}'  # spaced as json.dumps writes it
        assert "{" not in user["content"] and "answer" not in user["content"].lower()
    # finetune holds out every 20th record (the default --val-fraction 0.05): it must see more than one task
    held_out = [json.loads(line)["messages"][0]["content"].split()[:2] for line in lines[::20]]
    assert len({tuple(words) for words in held_out}) > 2


def test_the_default_template_trains_exactly_the_replies_and_their_end(tmp_path):
    # A BASE as the default run writes it: tokenizer.json (its <|endoftext|> special) and config.json's
    # eos_token_id, no tokenizer_config.json. Rendered as finetune renders it, the loss covers the reply
    # and the eos token after it, nothing else; the tokens before are what generate --chat prompts with.
    text = FILE.read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eos = tok.token_to_id("<|endoftext|>")
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": eos}))
    chat = ChatRenderer.for_checkpoint(tmp_path)
    records = list(read_records((str(FILE),), strict=True))
    for record, ex in zip(records, examples(iter(records), Tokenise(tok, eos, chat=chat), strict=True), strict=True):
        user, reply = record.value
        ids, mask = ex.ids.tolist(), ex.loss_mask.tolist()
        n = mask.index(True)
        assert mask == [False] * n + [True] * (len(ids) - n)
        assert ids[n:] == tok.encode(f" {reply['content']}", add_special_tokens=False).ids + [eos]
        assert ids[:n] == tok.encode(chat_prompt(tmp_path, user["content"]), add_special_tokens=False).ids
        assert tok.decode(ids[:n]) == f"User: {user['content']}\n\nAssistant:"
