"""Which structured-output library: llguidance, xgrammar and outlines-core on our byte-level BPE tokenizer, each
building its view of the tokenizer, compiling a nested five-field JSON schema, and computing the token mask at
each step of a seeded random walk through the schema (at most 300 tokens; a random walk often stays in
whitespace or a string, which is the mask's common case). A library that is not installed is skipped; only
llguidance is a dependency (the ``structured`` extra). To compare, without touching the environment:

    pip install --target /tmp/structured-libs --no-deps xgrammar apache-tvm-ffi outlines-core
    PYTHONPATH=/tmp/structured-libs python benchmarks/structured_backends.py --vocab 400 32000

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import uptime  # noqa: E402
from serve_structured import stdlib_tokenizer  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "role", "scores", "address"], "properties": {
              "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
              "role": {"enum": ["admin", "user", "guest"]},
              "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 4},
              "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                          "properties": {"city": {"type": "string", "maxLength": 12}, "zip": {"type": "integer"}}}}}
EOS = 0
STEPS = 300


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (outlines-core wants each token's bytes): printable bytes stand
    for themselves, the others for 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    codes = printable + [256 + n for n in range(len(extra))]
    return {chr(c): b for b, c in zip(printable + extra, codes, strict=True)}


def unpack(bitmask_W: torch.Tensor, V: int) -> torch.Tensor:
    bits = (bitmask_W.view(-1, 1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:V].bool()


def walk(step: Callable[[int | None], torch.Tensor | None], seed: int = 0) -> list[float]:
    """Seconds per mask along a random walk: ``step(token)`` consumes the token (None first) and returns the
    allowed tokens, or None once the grammar is done."""
    rng, times, token = random.Random(seed), [], None
    for _ in range(STEPS):
        start = time.perf_counter()
        allowed = step(token)
        times.append(time.perf_counter() - start)
        if allowed is None:
            break
        ids = [i for i in allowed.nonzero().flatten().tolist() if i != EOS]
        if not ids:
            break
        token = rng.choice(ids)
    return times


def run_llguidance(tok: Any, V: int) -> tuple[float, float, list[float]]:
    import llguidance as llg

    start = time.perf_counter()
    lltok = llg.LLTokenizer(tok.to_str(), eos_token=EOS)
    t_tok = time.perf_counter() - start
    start = time.perf_counter()
    m = llg.LLMatcher(lltok, llg.LLMatcher.grammar_from_json_schema(SCHEMA))
    t_compile = time.perf_counter() - start
    bitmask = torch.zeros((V + 31) // 32, dtype=torch.int32)

    def step(token: int | None) -> torch.Tensor | None:
        if token is not None:
            m.consume_token(token)
        if m.is_stopped():
            return None
        m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
        return unpack(bitmask, V)

    return t_tok, t_compile, walk(step)


def run_xgrammar(tok: Any, V: int) -> tuple[float, float, list[float]]:
    import xgrammar as xgr

    vocab: list[str] = [""] * V
    for piece, i in tok.get_vocab().items():
        vocab[i] = piece
    start = time.perf_counter()
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=V, stop_token_ids=[EOS])
    t_tok = time.perf_counter() - start
    start = time.perf_counter()
    m = xgr.GrammarMatcher(xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(json.dumps(SCHEMA)))
    t_compile = time.perf_counter() - start
    bitmask = torch.zeros(1, (V + 31) // 32, dtype=torch.int32)

    def step(token: int | None) -> torch.Tensor | None:
        if token is not None:
            m.accept_token(token)
        if m.is_terminated():
            return None
        m.fill_next_token_bitmask(bitmask)
        return unpack(bitmask[0], V)

    return t_tok, t_compile, walk(step)


def run_outlines_core(tok: Any, V: int) -> tuple[float, float, list[float]]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    to_byte = byte_decoder()
    start = time.perf_counter()
    pieces: dict[bytes, list[int]] = {}
    for piece, i in tok.get_vocab().items():
        if i != EOS:
            pieces.setdefault(bytes(to_byte[c] for c in piece), []).append(i)
    vocabulary = Vocabulary(EOS, pieces)
    t_tok = time.perf_counter() - start
    start = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary))
    t_compile = time.perf_counter() - start
    bitmask = torch.zeros((V + 31) // 32, dtype=torch.int32)

    def step(token: int | None) -> torch.Tensor | None:
        if token is not None:
            guide.advance(token, return_tokens=False)
        if guide.is_finished():
            return None
        guide.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)
        return unpack(bitmask, V)

    return t_tok, t_compile, walk(step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[400, 32000])
    p.add_argument("--tokenizer-files", type=int, default=600)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for vocab in args.vocab:
        tok = stdlib_tokenizer(vocab, args.tokenizer_files)
        V = tok.get_vocab_size()
        for name, fn in [("llguidance", run_llguidance), ("xgrammar", run_xgrammar),
                         ("outlines-core", run_outlines_core)]:
            try:
                t_tok, t_c, times = fn(tok, V)
            except ImportError as e:
                print(f"{name}: not installed ({e})")
                continue
            times.sort()
            rows.append({"library": name, "vocab": V, "tokenizer_ms": t_tok * 1e3, "compile_ms": t_c * 1e3,
                         "mask_p50_us": times[len(times) // 2] * 1e6, "mask_p90_us": times[int(len(times) * .9)] * 1e6,
                         "steps": len(times)})
    print(f"{'library':14s} {'vocab':>6} {'tokenizer ms':>13} {'compile ms':>11} {'mask p50 us':>12} {'p90 us':>8}")
    for r in rows:
        print(f"{r['library']:14s} {r['vocab']:>6} {r['tokenizer_ms']:>13.1f} {r['compile_ms']:>11.1f} "
              f"{r['mask_p50_us']:>12.1f} {r['mask_p90_us']:>8.1f}")
    load = uptime()
    print(load)
    print(json.dumps({"benchmark": "structured_backends", "rows": rows, "uptime": load}))


if __name__ == "__main__":
    main()
