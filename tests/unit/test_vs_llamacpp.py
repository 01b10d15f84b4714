"""The pure parts of benchmarks/vs_llamacpp.py and benchmarks/llamacpp.py, with nothing built or downloaded:
arguments, the tokenizer_config.json the GGUF converter needs (loaded back by transformers' AutoTokenizer, as
the converter loads it), llama-bench's command and JSON, the table's ratios, the CPU line, finding the tools."""

import importlib
import json
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# benchmarks/ on sys.path only while importing (the script adds itself too): left there, benchmarks/onnx.py
# shadowed the onnx package for every later test that exports (test_readme's docs/export.md after this file).
_saved_path = list(sys.path)
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    vs = importlib.import_module("vs_llamacpp")
    lc = importlib.import_module("llamacpp")
finally:
    sys.path[:] = _saved_path


def test_arguments() -> None:
    args = vs.parse_args([])
    assert (args.threads, args.prompt, args.gen, args.rounds, args.jobs) == (2, 64, 64, 3, 2)
    assert vs.parse_args(["--threads", "4", "--rounds", "1"]).threads == 4
    with pytest.raises(SystemExit):
        vs.parse_args(["--rounds", "0"])


def trained_tokenizer(tmp_path: Path) -> Path:
    from deepseek_moe.train.tokenizer import train_tokenizer

    texts = ["def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog\n"] * 20
    tok = train_tokenizer(texts, 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_tokenizer_config_loads_in_transformers_as_ours(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    d = trained_tokenizer(tmp_path)
    cfg = lc.prepare_tokenizer_config(json.loads((d / "tokenizer.json").read_text()), model_max_length=512)
    assert cfg["eos_token"] == cfg["bos_token"] == "<|endoftext|>"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = AutoTokenizer.from_pretrained(d)
    ours = Tokenizer.from_file(str(d / "tokenizer.json"))
    text = "def fox(dog):\n    return dog + 1  # over"
    assert hf.encode(text) == ours.encode(text).ids  # no BOS added, same ids
    assert hf.eos_token_id == 0 and hf.model_max_length == 512


def test_tokenizer_config_refuses_what_the_gpt2_vocabulary_cannot_hold(tmp_path: Path) -> None:
    tok = json.loads((trained_tokenizer(tmp_path) / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match=r"model\.type is 'WordLevel'"):
        lc.prepare_tokenizer_config({**tok, "model": {"type": "WordLevel"}}, model_max_length=8)
    with pytest.raises(ValueError, match="pre_tokenizer"):
        lc.prepare_tokenizer_config({**tok, "pre_tokenizer": {**tok["pre_tokenizer"], "use_regex": False}},
                                    model_max_length=8)
    with pytest.raises(ValueError, match="no special token"):
        lc.prepare_tokenizer_config({**tok, "added_tokens": []}, model_max_length=8)


def test_tokenizer_config_needs_a_q_lora_rank(tmp_path: Path) -> None:
    d = trained_tokenizer(tmp_path)
    (d / "config.json").write_text(json.dumps({"q_lora_rank": None, "num_hidden_layers": 6}))
    with pytest.raises(ValueError, match="q_lora_rank is null"):
        lc.write_tokenizer_config(d)
    (d / "config.json").write_text(json.dumps({"q_lora_rank": 384, "num_hidden_layers": 6,
                                               "max_position_embeddings": 128}))
    lc.write_tokenizer_config(d)
    assert json.loads((d / "tokenizer_config.json").read_text())["model_max_length"] == 128


def test_bench_command_and_json() -> None:
    tools = lc.Tools(Path("/x/llama-bench"), Path("/x/llama-quantize"))
    cmd = lc.bench_command(tools, Path("m.gguf"), threads=2, prompt=64, gen=32, repetitions=1, repack=True)
    assert cmd == ["/x/llama-bench", "-m", "m.gguf", "-t", "2", "-p", "64", "-n", "32", "-r", "1", "-o", "json"]
    assert lc.bench_command(tools, Path("m.gguf"), threads=2, prompt=64, gen=32, repetitions=1,
                            repack=False)[-2:] == ["--repack", "0"]
    # llama-bench -o json: one object per test, the fields its json_printer writes (abridged).
    out = json.dumps([
        {"n_prompt": 64, "n_gen": 0, "n_depth": 0, "avg_ts": 453.25, "samples_ts": [453.25]},
        {"n_prompt": 0, "n_gen": 32, "n_depth": 0, "avg_ts": 103.5, "samples_ts": [103.5]},
    ])
    assert lc.parse_bench_json(out, prompt=64, gen=32) == {"pp": 453.25, "tg": 103.5}
    with pytest.raises(lc.LlamaCppError, match="lacks pp64 or tg64"):
        lc.parse_bench_json(out, prompt=64, gen=64)
    with pytest.raises(lc.LlamaCppError, match="no JSON"):
        lc.parse_bench_json("GGML_ASSERT(*cur_backend_id != -1) failed", prompt=64, gen=64)


def test_table_ratios_pair_each_format() -> None:
    best = {"llama.cpp f32": {"pp": 400.0, "tg": 50.0}, "llama.cpp Q8_0": {"pp": 450.0, "tg": 100.0},
            "ours fp32": {"pp": 300.0, "tg": 40.0}, "ours bf16": {"pp": 200.0, "tg": 10.0},
            "ours int8": {"pp": 225.0, "tg": 125.0}, "ours int4": {"pp": 1.0, "tg": 1.0}}
    table = vs.format_table(best, prompt=64, gen=64).splitlines()
    assert table[0].startswith("| engine / format | prefill pp64 tok/s | decode tg64 tok/s |")
    assert "| ours fp32 | 300.0 | 40.0 | 0.75x | 0.80x (vs f32) |" in table
    assert "| ours bf16 | 200.0 | 10.0 | 0.50x | 0.20x (vs f32) |" in table
    assert "| ours int8 | 225.0 | 125.0 | 0.50x | 1.25x (vs Q8_0) |" in table
    assert "| ours int4 | 1.0 | 1.0 |  |  |" in table  # no Q4_0 measured: no ratio
    line = json.loads(vs.result_json(best, commit="abc"))
    assert line["benchmark"] == "vs_llamacpp" and line["commit"] == "abc"
    assert line["ratios"]["ours int8"] == {"pp": 0.5, "tg": 1.25} and "ours int4" not in line["ratios"]
    assert line["rows"]["llama.cpp Q8_0"] == {"pp_tok_s": 450.0, "tg_tok_s": 100.0}


def test_cpu_line() -> None:
    epyc = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma f16c bmi2\n"
    model, flags = vs.cpu_info(epyc)
    assert (model, flags) == ("AMD EPYC 7B13", ["avx2", "fma", "f16c"])
    assert vs.isa_summary(flags) == "AVX2+FMA+F16C (no AVX-512, no AMX)"
    xeon = ["avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"]
    assert vs.isa_summary(xeon) == "AVX2+FMA+F16C+AVX512F+AVX512-VNNI+AVX512-BF16+AMX-INT8+AMX-BF16"


def test_find_tools_prefers_path_then_the_newest_complete_build(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def tool(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    cache = tmp_path / "cache"
    tool(cache / "a" / "build" / "bin" / "llama-bench")  # no llama-quantize beside it
    assert lc.find_tools(cache) is None
    tool(cache / "a" / "build" / "bin" / "llama-quantize")
    assert lc.find_tools(cache) == lc.Tools(cache / "a/build/bin/llama-bench", cache / "a/build/bin/llama-quantize")
    path_dir = tmp_path / "path"
    tool(path_dir / "llama-bench")
    tool(path_dir / "llama-quantize")
    monkeypatch.setenv("PATH", str(path_dir))
    assert lc.find_tools(cache) == lc.Tools(path_dir / "llama-bench", path_dir / "llama-quantize")
