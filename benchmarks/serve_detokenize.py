"""Streaming detokenization: microseconds per token of the incremental detokenizer beside re-decoding the whole
output at every token (what the server did before issue 19), for outputs of growing length, measured side by side
in one run on the tokenizer of the serve tests (byte-level BPE) over multi-byte text.

    python benchmarks/serve_detokenize.py [--lengths 256 1024 4096]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

from common import uptime

from deepseek_moe.serve.text import IncrementalDetokenizer
from deepseek_moe.train.tokenizer import train_tokenizer

TEXT = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. ",
        "héllo wörld ünïcode ✓ 漢字 😀 "] * 20


def whole_output(tokenizer: Any, ids: list[int]) -> float:
    """The old way: decode everything so far at each token, release the new suffix."""
    start, released = time.perf_counter(), 0
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            released = len(text)
    assert released
    return time.perf_counter() - start


def incremental(tokenizer: Any, ids: list[int]) -> float:
    start = time.perf_counter()
    detok = IncrementalDetokenizer(tokenizer)
    for t in ids:
        detok.add(t)
    detok.finish()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    args = parser.parse_args()
    tokenizer = train_tokenizer(TEXT, 400)
    stream = tokenizer.encode("".join(TEXT) * 50).ids
    rows = []
    print(f"{platform.processor() or platform.machine()}; {uptime()}")
    print(f"{'tokens':>7} {'whole us/token':>15} {'incremental us/token':>21} {'ratio':>6}")
    for n in args.lengths:
        ids = stream[:n]
        old, new = whole_output(tokenizer, ids), incremental(tokenizer, ids)
        rows.append({"tokens": n, "whole_us_per_token": 1e6 * old / n, "incremental_us_per_token": 1e6 * new / n,
                     "ratio": old / new})
        print(f"{n:>7} {1e6 * old / n:>15.1f} {1e6 * new / n:>21.1f} {old / new:>6.1f}")
    print(json.dumps({"benchmark": "serve_detokenize", "rows": rows}))


if __name__ == "__main__":
    main()
