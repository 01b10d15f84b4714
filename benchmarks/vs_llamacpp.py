"""Ours against llama.cpp on one checkpoint: prefill pp64 and decode tg64 tokens/s at batch 1, 2 threads.

The mid-size DeepSeek-V2-shaped model (404M, benchmarks/common.py) with random weights and a byte-level BPE
tokenizer trained on this package's sources is saved once with ``deepseek_moe.save_pretrained`` (DeepSeek-V2's
Hugging Face layout, bf16), converted to an f32 GGUF by llama.cpp's own convert_hf_to_gguf.py and quantised to
Q8_0 and Q4_0 by llama-quantize. Then, in rounds that interleave every engine (the machine is shared, so each
round sees the same load): llama-bench on each GGUF (f32, Q8_0, Q4_0; one repetition a round, retried with
``--repack 0`` where the repacked run aborts) and ours loaded from the saved checkpoint (fp32, bf16, int8, int4,
quantised on load), measured as benchmarks/big_model.py --compare does. Best of the rounds; ratios ours over
llama.cpp's nearest format (bf16 over f32, as llama.cpp's bf16 path is not measured). Not part of CI.

llama-bench and llama-quantize come from PATH, else from the cache, else are built there from the
llama-cpp-python sdist (benchmarks/llamacpp.py; ~15 min on 2 idle cores, at the lowest priority).

    python benchmarks/vs_llamacpp.py                 # --rounds 3 --threads 2 --prompt 64 --gen 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import llamacpp  # noqa: E402
from common import mid_size, uptime  # noqa: E402

LLAMA_ROWS = {"llama.cpp f32": "F32", "llama.cpp Q8_0": "Q8_0", "llama.cpp Q4_0": "Q4_0"}
OURS_ROWS = {"ours fp32": ("float32", None), "ours bf16": ("bfloat16", None),
             "ours int8": ("float32", "int8"), "ours int4": ("float32", "int4")}
PAIRS = {"ours fp32": "llama.cpp f32", "ours bf16": "llama.cpp f32", "ours int8": "llama.cpp Q8_0",
         "ours int4": "llama.cpp Q4_0"}
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_int8", "amx_bf16")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None,
                    help="checkpoint and GGUF files (default: the cache's llama.cpp/vs_llamacpp-mid)")
    ap.add_argument("--llama-cpp-src", type=Path, default=None,
                    help="a llama.cpp source tree for the converter (and a build); default: the cached sdist's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64, help="prefill length (pp)")
    ap.add_argument("--gen", type=int, default=64, help="decode steps (tg)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of them is reported")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs if llama.cpp must be built")
    ap.add_argument("--no-build", action="store_true", help="fail instead of building llama.cpp")
    args = ap.parse_args(argv)
    for name in ("threads", "prompt", "gen", "rounds", "jobs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


# ----------------------------------------------------------------------------------------------------------
# The machine and the code measured


def cpu_info(cpuinfo: str) -> tuple[str, list[str]]:
    """The CPU's model name and which of ISA_FLAGS it has, from /proc/cpuinfo's text."""
    model, flags = platform.processor() or "unknown", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return model, [f for f in ISA_FLAGS if f in flags]


def isa_summary(flags: Sequence[str]) -> str:
    """One line for the table's header: the vector extensions that matter here, and the notable absences."""
    has = set(flags)
    parts = [n.upper() for n in ("avx2", "fma", "f16c") if n in has]
    wide = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16") if f in has]
    amx = [f for f in ("amx_int8", "amx_bf16") if f in has]
    parts += [f.upper().replace("_", "-") for f in wide] + [f.upper().replace("_", "-") for f in amx]
    missing = [name for name, present in (("AVX-512", wide), ("AMX", amx)) if not present]
    return "+".join(parts or ["no AVX2"]) + (f" (no {', no '.join(missing)})" if missing else "")


def commit_of(path: Path) -> str:
    """The git commit the benchmark runs from, ``-dirty`` when the tree has changes."""
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(path), *a], capture_output=True, text=True, check=False).stdout
    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no").strip() else "")


# ----------------------------------------------------------------------------------------------------------
# The table


def ratios(best: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """ours / llama.cpp per PAIRS, for the rows both sides measured."""
    return {ours: {k: best[ours][k] / best[ref][k] for k in ("pp", "tg")}
            for ours, ref in PAIRS.items() if ours in best and ref in best}


def format_table(best: dict[str, dict[str, float]], *, prompt: int, gen: int) -> str:
    """A Markdown table: a row per engine and format, tokens/s, and ours / llama.cpp where there is a pair."""
    r = ratios(best)
    lines = [f"| engine / format | prefill pp{prompt} tok/s | decode tg{gen} tok/s | ours / llama.cpp "
             f"pp{prompt} | tg{gen} |", "|---|---|---|---|---|"]
    for name, row in best.items():
        vs = (f"{r[name]['pp']:.2f}x | {r[name]['tg']:.2f}x (vs {PAIRS[name].removeprefix('llama.cpp ')})"
              if name in r else " | ")
        lines.append(f"| {name} | {row['pp']:.1f} | {row['tg']:.1f} | {vs} |")
    return "\n".join(lines)


def result_json(best: dict[str, dict[str, float]], **fields: Any) -> str:
    rows = {k: {"pp_tok_s": round(v["pp"], 2), "tg_tok_s": round(v["tg"], 2)} for k, v in best.items()}
    rs = {k: {"pp": round(v["pp"], 3), "tg": round(v["tg"], 3)} for k, v in ratios(best).items()}
    return json.dumps({"benchmark": "vs_llamacpp", **fields, "rows": rows, "ratios": rs})


# ----------------------------------------------------------------------------------------------------------
# Preparing the files


def write_checkpoint(directory: Path) -> None:
    """The mid-size model, random weights (seed 0), bf16, with a 4096-word tokenizer trained on our sources."""
    import torch

    import deepseek_moe as dm
    from deepseek_moe.train.tokenizer import train_tokenizer

    cfg = mid_size()
    sources = sorted(Path(dm.__file__).parent.rglob("*.py"))
    model = dm.DeepSeekMoEForCausalLM(cfg, init_seed=0)
    model.tokenizer = train_tokenizer([p.read_text() for p in sources], cfg.vocab_size)
    dm.save_pretrained(model.to(torch.bfloat16), directory)


def prepare(args: argparse.Namespace, work: Path) -> tuple[llamacpp.Tools, dict[str, Path], Path]:
    cache = llamacpp.cache_dir()
    source = args.llama_cpp_src or llamacpp.source_tree(cache)
    checkpoint = work / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        print(f"writing the mid-size checkpoint to {checkpoint}", flush=True)
        write_checkpoint(checkpoint)
    ggufs = {name: work / f"mid-{qtype.lower()}.gguf" for name, qtype in LLAMA_ROWS.items()}
    f32 = ggufs["llama.cpp f32"]
    if not f32.is_file():
        print(f"converting {checkpoint} to {f32}", flush=True)
        llamacpp.convert(source, checkpoint, f32)
    tools = llamacpp.find_tools(cache)
    if tools is None:
        if args.no_build:
            raise SystemExit(f"no llama-bench and llama-quantize on PATH or under {cache}, and --no-build")
        tools = llamacpp.build(source, args.jobs)
    for name, qtype in LLAMA_ROWS.items():
        if not ggufs[name].is_file():
            llamacpp.quantize(tools, f32, ggufs[name], qtype)
    return tools, ggufs, checkpoint


# ----------------------------------------------------------------------------------------------------------
# Measuring


def measure_ours(model: Any, prompt_ids: Any, gen: int) -> dict[str, float]:
    """As benchmarks/big_model.py --compare: one forward over the prompt; then ``gen`` single-token steps with
    the latent cache after a 16-token prompt, greedy."""
    t0 = time.perf_counter()
    model(prompt_ids)
    pp = prompt_ids.shape[1] / (time.perf_counter() - t0)
    cache = model.new_cache()
    tok = model(prompt_ids[:, :16], cache=cache).logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(gen):
        tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)
    return {"pp": pp, "tg": gen / (time.perf_counter() - t0)}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    import deepseek_moe as dm
    from deepseek_moe.kernels import mla_decode, rms_norm
    from deepseek_moe.kernels.quant_matmul import kernel_report

    work = args.dir or llamacpp.cache_dir() / "vs_llamacpp-mid"
    commit = commit_of(Path(__file__).parent)  # before the long run: the tree may move under it
    tools, ggufs, checkpoint = prepare(args, work)
    torch.set_num_threads(args.threads)
    model_name, flags = cpu_info(Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else "")
    load_before = uptime()
    print(load_before)
    ours = {name: dm.from_pretrained(checkpoint, dtype=dtype, quantize=q) for name, (dtype, q) in OURS_ROWS.items()}
    prompt_ids = torch.randint(0, mid_size().vocab_size, (1, max(args.prompt, 16)),
                               generator=torch.Generator().manual_seed(0))[:, :args.prompt]
    best: dict[str, dict[str, float]] = {name: {"pp": 0.0, "tg": 0.0} for name in [*LLAMA_ROWS, *OURS_ROWS]}
    repack = dict.fromkeys(LLAMA_ROWS, True)
    with torch.inference_mode():
        for model in ours.values():  # warm-up: kernel build, allocator
            measure_ours(model, prompt_ids[:, :16], 2)
        for r in range(args.rounds):
            for name in best:
                if name in LLAMA_ROWS:
                    got, repack[name] = llamacpp.bench(tools, ggufs[name], threads=args.threads,
                                                       prompt=args.prompt, gen=args.gen, repack=repack[name])
                else:
                    got = measure_ours(ours[name], prompt_ids, args.gen)
                best[name] = {k: max(best[name][k], got[k]) for k in ("pp", "tg")}
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v['tg']:.1f}" for n, v in best.items()),
                  flush=True)
    load_after = uptime()
    header = (f"{model_name}, {isa_summary(flags)}; batch 1, {args.threads} threads, best of {args.rounds} "
              f"interleaved rounds; ours at {commit}, quantised matmul kernel "
              f"{kernel_report()['quant_matmul']}, MLA decode "
              f"{'one C++ call' if mla_decode.kernel_available() else 'batched products'}, decode RMSNorm "
              f"{'one C++ call' if rms_norm.kernel_available() else 'torch'}; llama.cpp {tools.bench}"
              + ("" if all(repack.values()) else
                 f" (--repack 0 for {', '.join(n for n, v in repack.items() if not v)})"))
    print(f"\nmid-size ({dm.count_parameters(mid_size())[0] / 1e6:.0f}M parameters) {header}")
    print(format_table(best, prompt=args.prompt, gen=args.gen))
    print(f"load before: {load_before}\nload after:  {load_after}")
    print(result_json(best, commit=commit, cpu=model_name, isa_flags=flags,
                      threads=args.threads, rounds=args.rounds, prompt=args.prompt, gen=args.gen,
                      llama_bench=str(tools.bench), repack=repack,
                      kernel={**kernel_report(), "mla_decode": mla_decode.kernel_available(),
                              "rms_norm": rms_norm.kernel_available()},
                      torch_threads=torch.get_num_threads(), cores=os.cpu_count(),
                      uptime=[load_before, load_after]))


if __name__ == "__main__":
    main()
