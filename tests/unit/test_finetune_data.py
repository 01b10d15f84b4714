"""Fine-tuning data: the loss mask is exactly the assistant tokens, packing keeps examples apart, bad lines are
named by file:line."""

import json

import numpy as np
import pytest
import torch
from test_adapters_lora import small_model
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from deepseek_moe.finetune.data import ChatRenderer, DataError, Record, Tokenise, examples, read_records
from deepseek_moe.finetune.packing import pack, packed_forward, positions_and_mask

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def word_tokenizer() -> Tokenizer:
    words = ["<system>", "<user>", "<assistant>", "</s>", "be", "brief", "hi", "hello", "there", "bye", "ok",
             "what", "is", "two", "four", "[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"<[a-z]+>|</s>"), behavior="isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    return tok


def test_the_loss_mask_is_exactly_the_assistant_tokens():
    tok = word_tokenizer()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "what is two"},
                {"role": "assistant", "content": "four"}]
    ex = Tokenise(tok, eos_id=None, chat=ChatRenderer(TEMPLATE))(Record("x:1", "messages", messages))
    trained = [tok.id_to_token(int(i)) for i in ex.ids[ex.loss_mask]]
    assert "[UNK]" not in [tok.id_to_token(int(i)) for i in ex.ids]
    assert trained == ["hello", "there", "</s>", "four", "</s>"]  # the replies and their end-of-turn, nothing else
    everything = Tokenise(tok, eos_id=None, chat=ChatRenderer(TEMPLATE), loss_on="all")(
        Record("x:1", "messages", messages))
    assert everything.loss_mask.all() and np.array_equal(everything.ids, ex.ids)


def test_prompt_completion_trains_the_completion_and_eos():
    tok = word_tokenizer()
    ex = Tokenise(tok, eos_id=3)(Record("x:1", "prompt", ("what is two", "four")))
    assert [tok.id_to_token(int(i)) for i in ex.ids[ex.loss_mask]] == ["four", "</s>"]


def test_bad_lines_are_named_and_skipped_or_refused(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join([json.dumps({"text": "hi"}), "{not json", json.dumps({"messages": []}),
                               json.dumps({"prompt": "a"}), "", json.dumps([1]),
                               json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
                               json.dumps({"prompt": "what", "completion": "ok"})]) + "\n")
    reports = []
    kinds = [r.kind for r in read_records((str(data),), report=reports.append)]
    assert kinds == ["text", "prompt"]
    assert [r.split(":")[1] for r in reports] == ["2", "3", "4", "6", "7"]
    assert all(r.startswith(f"skipped {data}:") for r in reports)
    with pytest.raises(DataError, match=r"d\.jsonl:2: not JSON"):
        list(read_records((str(data),), strict=True))
    reports.clear()
    got = list(examples(read_records((str(data),), report=reports.append), Tokenise(word_tokenizer(), eos_id=3)))
    assert len(got) == 2


def test_packing_fills_rows_and_splits_long_examples():
    from deepseek_moe.finetune.data import Example

    exs = [Example(np.arange(1, n + 1), np.ones(n, bool)) for n in (3, 4, 9, 2)]
    rows = list(pack(exs, 8))
    docs = [r[2].tolist() for r in rows]
    assert docs == [[1, 1, 1, 2, 2, 2, 2, 0], [1] * 8, [1, 2, 2, 0, 0, 0, 0, 0]]
    labels = rows[0][1].tolist()
    assert labels == [-100, 2, 3, -100, 2, 3, 4, -100]  # first token of each example and padding carry no loss


def test_packed_examples_never_see_each_other():
    model = small_model()
    from deepseek_moe.finetune.data import Example

    g = torch.Generator().manual_seed(0)
    lengths = (5, 7, 4)
    exs = [Example(torch.randint(0, 64, (n,), generator=g).numpy(), np.ones(n, bool)) for n in lengths]
    rows = list(pack(exs, 20))
    assert len(rows) == 1 and rows[0][2].tolist() == [1] * 5 + [2] * 7 + [3] * 4 + [0] * 4
    batch = torch.from_numpy(np.stack(rows))
    with torch.no_grad():
        logits = packed_forward(model, batch).logits
        perturbed = batch.clone()
        perturbed[0, 0, 5:12] = (perturbed[0, 0, 5:12] + 1) % 64  # the middle example's tokens
        other = packed_forward(model, perturbed).logits
        alone = [model(torch.from_numpy(ex.ids)[None]).logits[0] for ex in exs]
    assert not torch.allclose(logits[0, 5:12], other[0, 5:12])
    torch.testing.assert_close(other[0, :5], logits[0, :5], rtol=0, atol=1e-6)
    torch.testing.assert_close(other[0, 12:16], logits[0, 12:16], rtol=0, atol=1e-6)
    for ex_logits, (start, n) in zip(alone, ((0, 5), (5, 7), (12, 4)), strict=True):
        torch.testing.assert_close(logits[0, start:start + n], ex_logits, rtol=0, atol=1e-5)


def test_positions_restart_per_example():
    docs = torch.tensor([[1, 1, 2, 2, 2, 0]])
    positions, mask = positions_and_mask(docs)
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0]]
    assert mask[0, 0, 3].tolist() == [False, False, True, True, False, False]
    assert mask[0, 0, 5].tolist() == [False] * 5 + [True]
