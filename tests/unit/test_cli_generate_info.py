"""``deepseek-moe generate`` and ``info``: numbers from model/counting.py, streamed text, errors for people."""

import io
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from deepseek_moe import from_pretrained, generate, save_pretrained
from deepseek_moe.cli.generate_cmd import TextStream
from deepseek_moe.cli.main import main
from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.model.counting import count_parameters, flops_per_token, kv_cache_bytes_per_token
from deepseek_moe.presets import PRESETS, get_preset

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Grüße aus München: naïve café, 日本語のテキスト.",
             "hello world, hello mixture of experts", "def f(x):\n    return x + 1\n"] * 4
EOS = "<|endoftext|>"


def tiny_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    return tok


def tiny_model(vocab_size: int, max_seq_len: int = 64) -> DeepSeekMoEForCausalLM:
    cfg = ModelConfig(vocab_size=vocab_size, dim=32, inter_dim=64, n_layers=2, n_dense_layers=1, n_heads=2,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                      max_seq_len=max_seq_len, original_seq_len=max_seq_len,
                      moe=MoEConfig(dim=32, moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2))
    torch.manual_seed(0)
    return DeepSeekMoEForCausalLM(cfg)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model"
    tok = tiny_tokenizer()
    model = tiny_model(tok.get_vocab_size())
    model.tokenizer = tok
    save_pretrained(model, path)
    return path


def expect_error(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ----------------------------------------------------------------------------------------------------------
# info

def test_info_tiny_matches_counting(capsys) -> None:
    assert main(["info", "tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = get_preset("tiny")
    total, activated = count_parameters(cfg)
    assert info["parameters"]["total"] == total and info["parameters"]["activated"] == activated
    assert info["parameters"]["activated_with_embedding"] == count_parameters(cfg, embedding_activated=True)[1]
    flops = info["flops_per_token"]
    assert flops["context"] == cfg.max_seq_len  # 512 < the default 4096
    assert flops["without_attention"] == flops_per_token(cfg, 0)
    assert flops["with_attention"] == flops_per_token(cfg, cfg.max_seq_len)
    kv = info["kv_cache_bytes_per_token"]
    assert kv["mla"]["bf16"] == kv_cache_bytes_per_token(cfg, torch.bfloat16)
    assert kv["mla"]["fp32"] == 2 * kv["mla"]["bf16"]
    assert kv["mha"]["bf16"] == kv_cache_bytes_per_token(cfg.replace(attention="mha"), torch.bfloat16)
    assert info["architecture"]["n_layers"] == 4 and info["architecture"]["n_dense_layers"] == 1
    assert info["experts"] == {**info["experts"], "routed": 16, "shared": 1, "activated": 4, "groups": 4,
                               "limited_groups": 2, "score_func": "softmax"}


def test_info_text(capsys) -> None:
    assert main(["info", "tiny", "--context", "100"]) == 0
    out = capsys.readouterr().out
    for fragment in ("4 (1 dense, 3 MoE)", "16 routed + 1 shared", "4 groups, top 2", "score softmax",
                     "at context 100", "MLA 640 B bf16", "MHA at the same head shapes"):
        assert fragment in out, out


def test_info_deepseek_v3_matches_published(capsys) -> None:
    assert main(["info", "deepseek-v3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["total"] / 1e9 == pytest.approx(671, rel=0.02)
    assert info["parameters"]["activated"] / 1e9 == pytest.approx(37, rel=0.02)
    assert info["experts"]["score_func"] == "sigmoid" and info["experts"]["routing_bias"]
    # MLA caches kv_lora_rank + qk_rope_head_dim = 576 elements per layer.
    assert info["kv_cache_bytes_per_token"]["mla"]["bf16"] == 61 * 576 * 2
    assert info["kv_cache_bytes_per_token"]["mha"]["bf16"] == 61 * 128 * (192 + 128) * 2


def test_info_reads_checkpoint_and_run_dir(capsys, checkpoint: Path) -> None:
    assert main(["info", str(checkpoint), "--json"]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert direct["architecture"]["vocab_size"] == tiny_tokenizer().get_vocab_size()
    assert main(["info", str(checkpoint.parent), "--json"]) == 0  # a run directory: model/ inside
    assert json.loads(capsys.readouterr().out)["parameters"] == direct["parameters"]


def test_info_errors(capsys, tmp_path: Path) -> None:
    err = expect_error(capsys, ["info", "deepseek-v9"], "'deepseek-v9'")
    assert all(name in err for name in PRESETS)
    expect_error(capsys, ["info", str(tmp_path / "missing")], "no such checkpoint directory")
    expect_error(capsys, ["info", str(tmp_path)], "no config.json")
    (tmp_path / "config.json").write_text("{not json")
    expect_error(capsys, ["info", str(tmp_path)], "config.json", "JSON")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    expect_error(capsys, ["info", str(tmp_path)], "config.json", "model_type 'llama'")
    expect_error(capsys, ["info", "tiny", "--context", "-1"], "--context")


# ----------------------------------------------------------------------------------------------------------
# generate

def test_generate_streams_text(capsys, checkpoint: Path) -> None:
    argv = ["generate", str(checkpoint), "--prompt", "hello world", "--max-new-tokens", "12", "--seed", "3",
            "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("hello world") and len(out) > len("hello world\n")
    assert main(argv) == 0
    assert capsys.readouterr().out == out  # seeded sampling repeats


def test_generate_accepts_run_dir_and_stops_at_eos(capsys, checkpoint: Path) -> None:
    # Declare the first token greedy decoding picks as config.json's eos: generation must stop right there.
    model = from_pretrained(checkpoint)
    prompt_ids = tiny_tokenizer().encode("hello").ids
    first = generate(model, [prompt_ids], max_new_tokens=1).new_tokens[0][0]
    run_dir = checkpoint.parent.parent / "run_eos"
    save_pretrained(model, run_dir / "model")
    config_file = run_dir / "model" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "eos_token_id": first}))
    assert main(["generate", str(run_dir), "--prompt", "hello", "--temperature", "0", "--max-new-tokens", "9"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "hello\n"  # the eos itself is not printed
    assert "[1 new tokens" in captured.err


def test_generate_chat_renders_the_checkpoints_template(capsys, checkpoint: Path, tmp_path: Path) -> None:
    # No tokenizer_config.json: the plain default template (the one finetune trains chats in); with one, its
    # chat_template. Either way the continuation is greedy decoding of exactly the rendered text.
    custom = tmp_path / "custom"
    shutil.copytree(checkpoint, custom)
    (custom / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ bos_token }}<{{ messages[0]['content'] }}>{% if add_generation_prompt %}={% endif %}",
         "bos_token": "<|endoftext|>"}))
    model, tok = from_pretrained(checkpoint), tiny_tokenizer()
    for ckpt, rendered in ((checkpoint, "User: hello world\n\nAssistant:"), (custom, "<|endoftext|><hello world>=")):
        assert main(["generate", str(ckpt), "--chat", "--prompt", "hello world", "--temperature", "0",
                     "--max-new-tokens", "6"]) == 0
        out = capsys.readouterr().out
        ids = tok.encode(rendered, add_special_tokens=False).ids
        assert ckpt == checkpoint or ids[0] == tok.token_to_id(EOS)  # the template's special token, read as one
        new = generate(model, [ids], max_new_tokens=6, stop_tokens=[tok.token_to_id(EOS)]).new_tokens[0]
        assert new and out == rendered + tok.decode(new, skip_special_tokens=True) + "\n"


def test_generate_speculative_prints_the_greedy_text(capsys, checkpoint: Path) -> None:
    argv = ["generate", str(checkpoint), "--prompt", "hello world hello world hello", "--temperature", "0",
            "--max-new-tokens", "20"]
    assert main(argv) == 0
    plain = capsys.readouterr()
    assert main([*argv, "--speculative", "ngram", "--num-draft-tokens", "3"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out
    assert "speculative: " in spec.err and "drafted tokens accepted" in spec.err
    expect_error(capsys, [*argv, "--speculative", "ngram", "--num-draft-tokens", "0"], "--num-draft-tokens")


def test_generate_speculative_mtp_drafts_with_the_checkpoints_modules(capsys, checkpoint: Path,
                                                                      tmp_path: Path) -> None:
    argv = ["--prompt", "hello world hello", "--temperature", "0", "--max-new-tokens", "12"]
    expect_error(capsys, ["generate", str(checkpoint), *argv, "--speculative", "mtp"], "--speculative mtp",
                 "mtp_depth 0")
    model = tiny_model(tiny_tokenizer().get_vocab_size())
    with_mtp = DeepSeekMoEForCausalLM(replace(model.config, mtp_depth=1), init_seed=1)
    with_mtp.tokenizer = tiny_tokenizer()
    save_pretrained(with_mtp, tmp_path / "mtp")
    assert main(["generate", str(tmp_path / "mtp"), *argv]) == 0
    plain = capsys.readouterr()
    assert main(["generate", str(tmp_path / "mtp"), *argv, "--speculative", "mtp", "--num-draft-tokens", "2"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out and "drafted tokens accepted" in spec.err


def test_text_stream_holds_back_split_characters() -> None:
    tok = tiny_tokenizer()
    byte_to_char = {b: c for b, c in zip(range(256), _bytes_to_unicode(), strict=True)}
    text = "日é!"
    ids = [tok.token_to_id(byte_to_char[b]) for b in text.encode()]  # one token per byte
    out = io.StringIO()
    writes: list[str] = []
    out.write = lambda s: writes.append(s) or len(s)  # type: ignore[method-assign]
    stream = TextStream(tok, out, stop_tokens={tok.token_to_id(EOS)})
    for token in [*ids, tok.token_to_id(EOS)]:
        stream(0, token)
    stream.finish()
    assert "".join(writes) == text
    assert writes == ["日", "é", "!"]  # no U+FFFD, nothing printed mid-character


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, which ByteLevel uses (in byte order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def test_generate_errors(capsys, checkpoint: Path, tmp_path: Path) -> None:
    expect_error(capsys, ["generate", str(tmp_path / "missing"), "--prompt", "hi"], "no such checkpoint directory")
    no_tok = tmp_path / "no_tokenizer"
    save_pretrained(tiny_model(320), no_tok)
    expect_error(capsys, ["generate", str(no_tok), "--prompt", "hi"], "tokenizer.json")
    expect_error(capsys, ["generate", str(checkpoint), "--prompt", "hello " * 80], "context of 64 tokens")
    expect_error(capsys, ["generate", str(checkpoint), "--prompt", "hi", "--top-p", "0"], "--top-p")
    expect_error(capsys, ["generate", str(checkpoint), "--prompt", "hi", "--device", "nonsense"], "--device")


def test_entry_point(checkpoint: Path) -> None:
    exe = shutil.which("deepseek-moe", path=str(Path(sys.executable).parent)) or shutil.which("deepseek-moe")
    if exe is None:
        pytest.skip("the deepseek-moe entry point is not installed")
    ok = subprocess.run([exe, "generate", str(checkpoint), "--prompt", "hello", "--max-new-tokens", "5",
                         "--seed", "0"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("hello")
    bad = subprocess.run([exe, "info", "no-such-preset"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
