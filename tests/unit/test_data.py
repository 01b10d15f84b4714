import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from deepseek_moe.train import corpus as corpus_mod
from deepseek_moe.train.corpus import Document, load_corpus, stdlib_dir, stdlib_paths
from deepseek_moe.train.data import PackedSequences, cached_tokens, tokenize, unigram_entropy
from deepseek_moe.train.errors import TrainError
from deepseek_moe.train.tokenizer import EOS, get_tokenizer, train_tokenizer

EXCLUDED = ("test/", "tests/", "idlelib/", "tkinter/", "lib2to3/", "ensurepip/", "distutils/", "turtledemo/",
            "site-packages/")


def test_stdlib_list_is_sorted_present_and_leaves_out_split_off_parts():
    paths = stdlib_paths()
    assert paths == sorted(paths) and len(paths) == len(set(paths)) > 100
    assert not [p for p in paths if p.startswith(EXCLUDED) or "/test" in p]
    root = Path(stdlib_dir())
    assert all((root / p).is_file() for p in paths)


def test_missing_stdlib_files_are_named(monkeypatch, tmp_path):
    fake = tmp_path / "list.txt"
    fake.write_text("# header\nos.py\nno_such_module.py\n")
    monkeypatch.setattr(corpus_mod, "STDLIB_LIST", fake)
    with pytest.raises(TrainError, match="no_such_module.py"):
        corpus_mod.load_stdlib_corpus(0.05)


def _write_corpus(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    for i in range(30):
        (root / "sub" / f"f{i:02d}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    (root / ".hidden").write_text("ignored")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)  # binary files in folders are skipped
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 10}) for i in range(5)))


def test_folder_corpus_split_is_deterministic(tmp_path):
    _write_corpus(tmp_path)
    a = load_corpus((str(tmp_path),), text_field="text", val_fraction=0.2)
    b = load_corpus((str(tmp_path),), text_field="text", val_fraction=0.2)
    assert a == b and a.train and a.val
    names = {d.name for d in a.train + a.val}
    assert len(names) == 35 and not any("hidden" in n or "blob" in n for n in names)
    assert not {d.name for d in a.train} & {d.name for d in a.val}


def test_single_document_is_split_by_lines(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    c = load_corpus((str(f),), text_field="text", val_fraction=0.1)
    assert c.train[0].text + c.val[0].text == f.read_text()
    assert c.val[0].text.startswith("line 90")


@pytest.mark.parametrize(("setup", "message"), [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text("   \n"), "hold no text"),
    (lambda p: p.write_bytes(b"\x7fELF\x00\x00binary"), "binary"),
    (lambda p: p.write_bytes(b"caf\xe9 latin-1"), "not UTF-8"),
])
def test_bad_data_paths_are_named(tmp_path, setup, message):
    path = tmp_path / "data.txt"
    setup(path)
    with pytest.raises(TrainError, match=message) as info:
        load_corpus((str(path),), text_field="text", val_fraction=0.1)
    assert "data.txt" in str(info.value)


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(TrainError, match=r"d\.jsonl:2 .*'text'"):
        load_corpus((str(path),), text_field="text", val_fraction=0.1)


def test_empty_folder(tmp_path):
    with pytest.raises(TrainError, match="no text"):
        load_corpus((str(tmp_path),), text_field="text", val_fraction=0.1)


def test_tokenizer_is_cached_and_round_trips(tmp_path):
    _write_corpus(tmp_path / "c")
    c = load_corpus((str(tmp_path / "c"),), text_field="text", val_fraction=0.2)
    tok = get_tokenizer(c, 300, tmp_path / "cache")
    files = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert len(files) == 1 and tok.get_vocab_size() <= 300
    assert get_tokenizer(c, 300, tmp_path / "cache").to_str() == tok.to_str()
    text = "def f(x):\n    return x * 7\n"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id(EOS) == 0


def test_cached_tokens_are_memory_mapped_and_end_documents_with_eos(tmp_path):
    docs = (Document("a", "hello world"), Document("b", "more text"))
    tok = train_tokenizer([d.text for d in docs], 280)
    arr = cached_tokens(docs, tok, tmp_path, "k")
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint16
    assert np.array_equal(arr, tokenize(docs, tok))
    assert (arr == tok.token_to_id(EOS)).sum() == 2 and arr[-1] == tok.token_to_id(EOS)


def test_unigram_entropy():
    assert unigram_entropy(np.arange(8), 16) == pytest.approx(math.log(8))
    assert unigram_entropy(np.zeros(5, dtype=np.uint16), 4) == 0.0


def test_packed_sequences_cover_each_epoch_in_a_seeded_order():
    tokens = np.arange(100, dtype=np.uint16)
    seqs = PackedSequences(tokens, 10, seed=1)
    first = torch.cat([seqs.next_batch(3) for _ in range(3)] + [seqs.next_batch(1)])  # 10 = one epoch
    assert sorted(first[:, 0].tolist()) == list(range(0, 100, 10))
    assert torch.equal(first[0], torch.arange(first[0, 0], first[0, 0] + 10))
    second = seqs.next_batch(10)
    assert seqs.epoch == 1 and not torch.equal(first[:, 0], second[:, 0])
    again = PackedSequences(tokens, 10, seed=1)
    assert torch.equal(again.next_batch(10), first)


def test_packed_sequences_resume_exactly():
    tokens = np.arange(1000, dtype=np.uint16)
    a = PackedSequences(tokens, 7, seed=3)
    for _ in range(30):
        a.next_batch(5)
    b = PackedSequences(tokens, 7, seed=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(40):
        assert torch.equal(a.next_batch(5), b.next_batch(5))
    with pytest.raises(TrainError, match="seq_len changed"):
        PackedSequences(tokens, 8, seed=3).load_state_dict(a.state_dict())


def test_too_little_data_for_one_sequence():
    with pytest.raises(TrainError, match="seq_len"):
        PackedSequences(np.arange(5, dtype=np.uint16), 10, seed=0)


def test_val_paths_hold_out_other_text(tmp_path):
    """Item 13: validation text given apart; every training document then trains, and the hash covers both."""
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    for i in range(12):
        (train_dir / f"m{i}.py").write_text(f"x = {i}\n" * 5)
    val = tmp_path / "held_out.txt"
    val.write_text("def held_out():\n    return 1\n")
    extra = tmp_path / "more.jsonl"
    extra.write_text(json.dumps({"text": "y = 2"}) + "\n")

    c = load_corpus((str(train_dir),), text_field="text", val_fraction=0.5, val_paths=(str(val), str(extra)))
    assert [d.name for d in c.train] == [str(p) for p in sorted(train_dir.iterdir())]  # none split off
    assert [d.text for d in c.val] == [val.read_text(), "y = 2"]
    assert c.describe()["val_source"] == f"{val}, {extra}" and c.describe()["n_val_documents"] == 2
    split = load_corpus((str(train_dir),), text_field="text", val_fraction=0.5)
    assert "val_source" not in split.describe() and c.sha256 != split.sha256
    val.write_text("def other():\n    return 2\n")
    assert load_corpus((str(train_dir),), text_field="text", val_fraction=0.5,
                       val_paths=(str(val), str(extra))).sha256 != c.sha256
    with pytest.raises(TrainError, match="both training text"):
        load_corpus((str(train_dir),), text_field="text", val_fraction=0.1, val_paths=(str(train_dir / "m3.py"),))
    with pytest.raises(TrainError, match="validation data path"):
        load_corpus((str(train_dir),), text_field="text", val_fraction=0.1, val_paths=(str(tmp_path / "nope"),))
