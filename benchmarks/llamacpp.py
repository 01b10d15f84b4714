"""llama.cpp for benchmarks/vs_llamacpp.py: found or built, and fed one of our saved checkpoints as GGUF.

llama.cpp publishes no package with its tools, but the ``llama-cpp-python`` sdist on PyPI vendors its whole
source tree (``vendor/llama.cpp``): the C++ tools, ``convert_hf_to_gguf.py`` and the ``gguf`` package it needs
(``gguf-py``). So everything comes from a package index by name, and is kept under the project's cache
(``deepseek_moe.env.cache_root()``, ``$DEEPSEEK_MOE_CACHE``)::

    llama.cpp/llama_cpp_python-X.tar.gz                     the sdist (pip download)
    llama.cpp/llama_cpp_python-X/vendor/llama.cpp           its source: converter, gguf-py, C++
    llama.cpp/llama_cpp_python-X/build/bin/llama-bench      built once (cmake + ninja), with llama-quantize

The tools on PATH win over the cache; the converter always comes from a source tree (the cached sdist's, or
``--llama-cpp-src``), as the one on PATH may be of another version.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepseek_moe import env

SDIST = "llama-cpp-python"
TOOLS = ("llama-bench", "llama-quantize")
# Only the two tools and the libraries they link; no server, tests, examples, or TLS/HTTP (the model is local).
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF")
# The converter picks llama.cpp's pre-tokenizer (the regex that splits text before BPE) by hashing how the
# tokenizer encodes a fixed text, and refuses a hash it does not know, as any newly trained tokenizer's is.
# Ours is a byte-level BPE with the GPT-2 split (tokenizers' ByteLevel pre-tokenizer, use_regex=True), which
# llama.cpp calls "gpt-2"; prepare_tokenizer_config checks that before this is used.
PRE_TOKENIZER = "gpt-2"
CONVERT = """\
import runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class Tools:
    bench: Path
    quantize: Path


class LlamaCppError(RuntimeError):
    """A step of fetching, building, converting or benchmarking failed; the message says which and why."""


def cache_dir() -> Path:
    return env.cache_root() / "llama.cpp"


# ----------------------------------------------------------------------------------------------------------
# Finding and building the tools


def find_tools(cache: Path) -> Tools | None:
    """llama-bench and llama-quantize from one directory: PATH's, else the newest build in ``cache``."""
    on_path = [shutil.which(t) for t in TOOLS]
    if all(on_path):
        return Tools(*(Path(p) for p in on_path if p))
    for bin_dir in sorted(cache.glob("*/build/bin"), key=lambda p: p.stat().st_mtime, reverse=True):
        if all((bin_dir / t).is_file() and os.access(bin_dir / t, os.X_OK) for t in TOOLS):
            return Tools(bin_dir / TOOLS[0], bin_dir / TOOLS[1])
    return None


def source_tree(cache: Path) -> Path:
    """The llama.cpp tree of the cached sdist, downloaded and unpacked on first use."""
    trees = sorted(cache.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if trees:
        return trees[-1].parent
    cache.mkdir(parents=True, exist_ok=True)
    sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        print(f"downloading the {SDIST} sdist (its vendor/llama.cpp) into {cache}", flush=True)
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(cache)],
            what=f"pip download {SDIST}")
        sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise LlamaCppError(f"pip download {SDIST} wrote no llama_cpp_python-*.tar.gz into {cache}")
    with tarfile.open(sdists[-1]) as tar:
        tar.extractall(cache, filter="data")
    tree = cache / sdists[-1].name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if not (tree / "convert_hf_to_gguf.py").is_file():
        raise LlamaCppError(f"{sdists[-1]} has no vendor/llama.cpp/convert_hf_to_gguf.py")
    return tree


def build(source: Path, jobs: int) -> Tools:
    """Build llama-bench and llama-quantize from ``source`` into ``source/../../build`` at the lowest priority
    (the machine is shared); ~15 min on 2 idle cores. A failed step raises with the end of its log."""
    missing = [t for t in ("cmake", "ninja") if shutil.which(t) is None]
    if missing:
        raise LlamaCppError(f"building llama.cpp needs {' and '.join(missing)} on PATH: "
                            "pip install cmake ninja, or apt-get install cmake ninja-build")
    build_dir = source.parent.parent / "build"
    log = build_dir.parent / "build.log"
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []
    print(f"building {', '.join(TOOLS)} from {source} into {build_dir} ({jobs} jobs, log {log})", flush=True)
    with open(log, "a") as out:
        for cmd in ([*nice, "cmake", "-S", str(source), "-B", str(build_dir), "-G", "Ninja", *CMAKE_FLAGS],
                    [*nice, "ninja", "-C", str(build_dir), f"-j{jobs}", *TOOLS]):
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode != 0:
                raise LlamaCppError(f"`{' '.join(cmd)}` failed; the end of {log}:\n{log.read_text()[-3000:]}")
    return Tools(build_dir / "bin" / TOOLS[0], build_dir / "bin" / TOOLS[1])


# ----------------------------------------------------------------------------------------------------------
# Our checkpoint as GGUF


def prepare_tokenizer_config(tokenizer: dict[str, Any], *, model_max_length: int) -> dict[str, Any]:
    """The tokenizer_config.json the converter needs beside our tokenizer.json (``tokenizer``, parsed): without
    one transformers' AutoTokenizer, which the converter calls, cannot tell which class to load. The converter
    writes a GPT-2-style vocabulary, so the tokenizer must be a byte-level BPE with the GPT-2 split; its first
    special token (ours: ``<|endoftext|>``, id 0) is the end-of-sequence token."""
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json: model.type is {model.get('type')!r}; the GGUF export expects 'BPE'")
    pre = tokenizer.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise ValueError(f"tokenizer.json: pre_tokenizer is {pre!r}; the GGUF export expects ByteLevel with "
                         f"use_regex true (llama.cpp's {PRE_TOKENIZER!r} split)")
    special = [t["content"] for t in tokenizer.get("added_tokens") or [] if t.get("special")]
    if not special:
        raise ValueError("tokenizer.json: no special token in added_tokens to serve as end of sequence")
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special[0], "eos_token": special[0],
            "add_bos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": model_max_length}


def write_tokenizer_config(checkpoint: Path) -> None:
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    hf = json.loads((checkpoint / "config.json").read_text())
    if hf.get("q_lora_rank") is None and hf.get("num_hidden_layers") not in (26, 27):
        # llama.cpp's deepseek2 loader decides q-LoRA from the layer count (V2-Lite's 27: none), not the file.
        raise ValueError(f"{checkpoint}/config.json: q_lora_rank is null; llama.cpp reads such a model as q-LoRA "
                         "unless it has 26 or 27 layers")
    cfg = prepare_tokenizer_config(tok, model_max_length=int(hf.get("max_position_embeddings", 4096)))
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def convert(source: Path, checkpoint: Path, out: Path) -> Path:
    """``checkpoint`` (DeepSeek-V2's Hugging Face layout, with tokenizer.json) as an f32 GGUF at ``out``."""
    write_tokenizer_config(checkpoint)
    run([sys.executable, "-c", CONVERT.format(pre=PRE_TOKENIZER), str(source), str(checkpoint),
         "--outtype", "f32", "--outfile", str(out)], what="convert_hf_to_gguf.py")
    return out


def quantize(tools: Tools, src: Path, dst: Path, qtype: str) -> Path:
    run([str(tools.quantize), str(src), str(dst), qtype, "2"], what=f"llama-quantize {qtype}")
    return dst


# ----------------------------------------------------------------------------------------------------------
# llama-bench


def bench_command(tools: Tools, gguf: Path, *, threads: int, prompt: int, gen: int, repetitions: int,
                  repack: bool) -> list[str]:
    """pp``prompt`` and tg``gen`` at ``threads``, as JSON on stdout. ``repack=False`` keeps weights in the
    GGUF's layout: the repacked CPU buffers abort on some machines with GGML_ASSERT(*cur_backend_id != -1)."""
    cmd = [str(tools.bench), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
           "-r", str(repetitions), "-o", "json"]
    return cmd if repack else [*cmd, "--repack", "0"]


def parse_bench_json(text: str, *, prompt: int, gen: int) -> dict[str, float]:
    """llama-bench's ``-o json`` (a list of tests) as {"pp": tokens/s, "tg": tokens/s}."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as e:
        raise LlamaCppError(f"llama-bench printed no JSON ({e}); its output began: {text[:300]!r}") from e
    out: dict[str, float] = {}
    for t in tests:
        if t.get("n_prompt") == prompt and t.get("n_gen") == 0:
            out["pp"] = float(t["avg_ts"])
        elif t.get("n_gen") == gen and t.get("n_prompt") == 0:
            out["tg"] = float(t["avg_ts"])
    if set(out) != {"pp", "tg"}:
        raise LlamaCppError(f"llama-bench JSON lacks pp{prompt} or tg{gen}: {text[:300]!r}")
    return out


def bench(tools: Tools, gguf: Path, *, threads: int, prompt: int, gen: int, repetitions: int = 1,
          repack: bool = True) -> tuple[dict[str, float], bool]:
    """One llama-bench run: ({"pp", "tg"} tokens/s, the repack setting that ran). Retried once with
    ``--repack 0`` when the repacked run fails."""
    cmd = bench_command(tools, gguf, threads=threads, prompt=prompt, gen=gen, repetitions=repetitions,
                        repack=repack)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 and repack:
        print(f"llama-bench {gguf.name} failed ({proc.returncode}); retrying with --repack 0", flush=True)
        return bench(tools, gguf, threads=threads, prompt=prompt, gen=gen, repetitions=repetitions, repack=False)
    if proc.returncode != 0:
        raise LlamaCppError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return parse_bench_json(proc.stdout, prompt=prompt, gen=gen), repack


def run(cmd: list[str], *, what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LlamaCppError(f"{what} failed ({proc.returncode}): `{' '.join(cmd)}`\n{proc.stderr[-3000:]}")
