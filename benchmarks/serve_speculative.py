"""Speculative decoding in the server's scheduler (no HTTP): decode tokens/s of the continuous-batching scheduler
without drafts, with MTP drafts and with n-gram drafts, at batch 1 and batch 4, greedy.

With ``--checkpoint DIR`` (a model trained with MTP, e.g. ``deepseek-moe train --mtp-depth 1``): that model on
slices of a real text (the standard library's ``textwrap.py``; the default run trains on standard-library sources,
so it may be in its training split: say so with the numbers). Without it: the tiny preset with ``mtp_depth=1`` and
random weights on random prompts, whose MTP drafts are almost never right: that row shows what drafting costs when
it buys nothing, not what a trained module gains.

A run submits the batch's requests at once, steps until every prompt is in, then times the steps until all have
``--new-tokens`` tokens; each batch size runs the same 4 prompts (batch 1: one after another, batch 4: together):
decode tokens/s = tokens emitted in those steps / their seconds. Modes alternate within
each repeat (interleaved, ``--repeats`` times; medians) so that the load of the shared machine falls on all alike;
each mode's greedy tokens are checked equal to the plain run's.

    python benchmarks/serve_speculative.py [--new-tokens 48] [--repeats 3] [--k 2] [--threads 1]
    python benchmarks/serve_speculative.py --checkpoint runs/mtp/model
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import uptime

from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.presets import get_preset
from deepseek_moe.serve.request import Request, SamplingParams, TokenEvent
from deepseek_moe.serve.scheduler import Scheduler, SchedulerConfig

MODES = (None, "mtp", "ngram")


def run(model: DeepSeekMoEForCausalLM, prompts: list[list[int]], mode: str | None, k: int,
        new_tokens: int) -> tuple[int, float, list[list[int]], float, float]:
    """One batch through a fresh scheduler: (decode tokens, their seconds, each request's tokens, accepted drafts,
    verifications)."""
    s = Scheduler(model, SchedulerConfig(max_batch_size=len(prompts), max_batch_tokens=4096, speculative=mode,
                                         num_draft_tokens=k, kv_cache_bytes=1 << 28, prefix_cache=False))
    outs: list[list[int]] = [[] for _ in prompts]
    for out, p in zip(outs, prompts, strict=True):
        def sink(e: object, out: list[int] = out) -> None:
            if isinstance(e, TokenEvent):
                out.append(e.token)
        s.submit(Request(p, SamplingParams(max_tokens=new_tokens, ignore_eos=True), sink))
    while any(not o for o in outs):  # every prompt in: each request has its first token
        s.step()
    done = sum(map(len, outs))
    start = time.perf_counter()
    while s.has_work():
        s.step()
    seconds = time.perf_counter() - start
    m = s.metrics
    return sum(map(len, outs)) - done, seconds, outs, m.spec_accepted_tokens.value, m.spec_verifications.value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a model trained with MTP (default: the tiny preset, random weights)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=2, help="drafted tokens per step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,4", help="batch sizes dividing 4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        import inspect
        import textwrap

        from deepseek_moe import from_pretrained

        model = from_pretrained(args.checkpoint).eval()
        assert model.tokenizer is not None
        ids = model.tokenizer.encode(inspect.getsource(textwrap)).ids
        source = f"{args.checkpoint} on textwrap.py"
        prompt_at = [i * 997 % max(len(ids) - args.prompt_tokens, 1) for i in range(4)]
        pool = [ids[a:a + args.prompt_tokens] for a in prompt_at]
    else:
        model = DeepSeekMoEForCausalLM(get_preset("tiny").replace(mtp_depth=1), init_seed=0).eval()
        g = torch.Generator().manual_seed(0)
        pool = [torch.randint(1, model.config.vocab_size, (args.prompt_tokens,), generator=g).tolist()
                for _ in range(4)]
        source = "tiny preset, mtp_depth=1, random weights, random prompts"
    batches = [int(b) for b in args.batches.split(",")]
    speeds: dict[tuple[int, str], list[float]] = {}
    per_verify: dict[tuple[int, str], float] = {}
    for _ in range(args.repeats):
        for b in batches:
            plain_tokens = None
            for mode in MODES:
                n = secs = accepted = verified = 0.0
                tokens = []
                for i in range(0, 4, b):
                    got = run(model, pool[i:i + b], mode, args.k, args.new_tokens)
                    n, secs, accepted, verified = n + got[0], secs + got[1], accepted + got[3], verified + got[4]
                    tokens += got[2]
                tps = n / secs
                pv = (accepted + verified) / verified if verified else float("nan")
                if mode is None:
                    plain_tokens = tokens
                elif tokens != plain_tokens:
                    raise SystemExit(f"batch {b}, {mode}: greedy tokens differ from the plain run's")
                speeds.setdefault((b, str(mode)), []).append(tps)
                per_verify[(b, str(mode))] = pv
    load = uptime()
    print(f"{source}; {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, k={args.k}, "
          f"{args.threads} thread(s), medians of {args.repeats} interleaved repeats; load: {load}")
    print(f"{'batch':>5} | {'plain tok/s':>11} | {'mtp tok/s':>9} | {'mtp x':>6} | {'mtp tok/verify':>14} | "
          f"{'ngram tok/s':>11} | {'ngram x':>7} | {'ngram tok/verify':>16}")
    rows = []
    for b in batches:
        med = {m: statistics.median(speeds[(b, m)]) for m in ("None", "mtp", "ngram")}
        row = {"batch": b, "plain_tps": med["None"], "mtp_tps": med["mtp"], "mtp_speedup": med["mtp"] / med["None"],
               "mtp_tokens_per_verify": per_verify[(b, "mtp")], "ngram_tps": med["ngram"],
               "ngram_speedup": med["ngram"] / med["None"], "ngram_tokens_per_verify": per_verify[(b, "ngram")]}
        rows.append(row)
        print(f"{b:>5} | {row['plain_tps']:>11.1f} | {row['mtp_tps']:>9.1f} | {row['mtp_speedup']:>5.2f}x | "
              f"{row['mtp_tokens_per_verify']:>14.2f} | {row['ngram_tps']:>11.1f} | {row['ngram_speedup']:>6.2f}x | "
              f"{row['ngram_tokens_per_verify']:>16.2f}")
    print(json.dumps({"benchmark": "serve_speculative", "source": source, "k": args.k, "threads": args.threads,
                      "new_tokens": args.new_tokens, "load": load, "rows": rows}))


if __name__ == "__main__":
    main()
