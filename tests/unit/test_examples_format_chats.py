"""examples/data/format_chats.jsonl: the file its script writes, every line a chat finetune reads, and rendered as
the default run (a BASE with no tokenizer_config.json) renders it: the plain default template, with the loss on
exactly the ``ANSWER: ... END`` replies."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
        assert re.fullmatch(r"ANSWER: \S+ END", reply["content"]), r.where
        assert "ANSWER" not in user["content"] and "END" not in user["content"]
    # finetune holds out every 20th record (the default --val-fraction 0.05): it must see more than one task
    held_out = [json.loads(line)["messages"][0]["content"].split()[:2] for line in lines[::20]]
    assert len({tuple(words) for words in held_out}) > 2


def test_the_default_template_trains_exactly_the_replies(tmp_path):
    text = FILE.read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    chat = ChatRenderer.for_checkpoint(tmp_path)  # a BASE without tokenizer_config.json, as finetune reads it
    records = list(read_records((str(FILE),), strict=True))
    for record, ex in zip(records, examples(iter(records), Tokenise(tok, 0, chat=chat), strict=True), strict=True):
        user, reply = record.value
        trained = [i for i, m in zip(ex.ids.tolist(), ex.loss_mask.tolist(), strict=True) if m]
        prompt = [i for i, m in zip(ex.ids.tolist(), ex.loss_mask.tolist(), strict=True) if not m]
        assert tok.decode(prompt) == f"User: {user['content']}\n\nAssistant:"  # what generate --chat prompts with
        assert tok.decode(trained) == f" {reply['content']}\n\n"
        assert ex.loss_mask.tolist() == [False] * len(prompt) + [True] * len(trained)
