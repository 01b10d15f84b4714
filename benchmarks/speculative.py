"""Speculative decoding at batch 1: acceptance and decode tokens/s with and without it (n-gram prompt lookup).

A model with random weights (the tiny preset, or the mid-size model of benchmarks/common.py) in float32, bfloat16
and int8 (deepseek_moe.quant), greedy, on a repetitive prompt (a random 24-token phrase repeated four times). A
random model does not copy its prompt the way a trained one does, so the n-gram row's acceptance is low and is not
what real text gives. To show what speculation buys at a given acceptance, two more rows draft with an oracle:
the plain run's own greedy continuation, each drafted token replaced by a wrong one with probability 0.05 or
0.3 (seeded); its drafting costs nothing, like n-gram lookup. Plain and speculative runs alternate (interleaved,
``--repeats`` times) so that the load of the shared machine falls on all alike; every speculative run's greedy
tokens are checked equal to the plain run's.

    python benchmarks/speculative.py [--new-tokens 48] [--repeats 2] [--k 4] [--shape mid|tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import mid_size, uptime

from deepseek_moe.config import ModelConfig
from deepseek_moe.infer.draft import Draft, NgramDrafter
from deepseek_moe.infer.generate import generate
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.presets import get_preset
from deepseek_moe.quant import QuantConfig, quantize_model


class OracleDrafter:
    """Drafts the known greedy continuation ``reference`` (prompt + new tokens), each token wrong with
    probability ``error`` (a seeded draw), to set the acceptance rate."""

    def __init__(self, reference: list[int], error: float, vocab_size: int, seed: int = 0) -> None:
        self.reference, self.error, self.vocab_size = reference, error, vocab_size
        self.generator = torch.Generator().manual_seed(seed)

    def propose(self, context: list[int], k: int) -> Draft:
        true = self.reference[len(context):len(context) + k]
        wrong = torch.rand(len(true), generator=self.generator) < self.error
        return Draft([(t + 1) % self.vocab_size if w else t for t, w in zip(true, wrong.tolist(), strict=True)])


def make(error: float | None, reference: list[int], vocab_size: int) -> NgramDrafter | OracleDrafter:
    return NgramDrafter() if error is None else OracleDrafter(reference, error, vocab_size)


def build(cfg: ModelConfig, variant: str) -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(cfg).eval()
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    elif variant == "int8":
        model = quantize_model(model, QuantConfig(bits=8))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--k", type=int, default=4, help="num_draft_tokens")
    ap.add_argument("--shape", choices=("mid", "tiny"), default="mid")
    ap.add_argument("--variants", default="fp32,bf16,int8")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = mid_size() if args.shape == "mid" else get_preset("tiny")
    g = torch.Generator().manual_seed(1)
    phrase = torch.randint(1, cfg.vocab_size, (24,), generator=g).tolist()
    prompt = phrase * 4
    V = cfg.vocab_size
    load_before = uptime()
    rows = []
    for variant in args.variants.split(","):
        model = build(cfg, variant)
        generate(model, [prompt], max_new_tokens=4)  # warm-up
        reference = prompt + generate(model, [prompt], max_new_tokens=args.new_tokens).new_tokens[0]
        errors: dict[str, float | None] = {"ngram": None, "oracle-0.05": 0.05, "oracle-0.3": 0.3}

        plain_s: list[float] = []
        spec_s: dict[str, list[float]] = {name: [] for name in errors}
        stats = {}
        for _ in range(args.repeats):
            plain = generate(model, [prompt], max_new_tokens=args.new_tokens)
            plain_s.append(plain.decode_tokens_per_s)
            for name in errors:
                spec = generate(model, [prompt], max_new_tokens=args.new_tokens, drafter=make(errors[name], reference, V),
                                num_draft_tokens=args.k)
                if spec.new_tokens != plain.new_tokens:
                    raise SystemExit(f"{variant} {name}: speculative greedy differs from plain greedy")
                spec_s[name].append(spec.decode_tokens_per_s)
                stats[name] = spec.speculative
        p = statistics.median(plain_s)
        for name in errors:
            st = stats[name]
            s_ = statistics.median(spec_s[name])
            rows.append({"variant": variant, "drafter": name, "plain_tok_s": round(p, 2), "spec_tok_s": round(s_, 2),
                         "speedup": round(s_ / p, 2), "acceptance": round(st.acceptance_rate, 3),
                         "mean_accept_len": round(st.mean_acceptance_length, 2), "drafted": st.drafted,
                         "accepted": st.accepted})
        del model
    print(f"shape {args.shape}, batch 1, greedy, {args.new_tokens} new tokens, k={args.k}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved runs")
    print(f"{'variant':8} {'drafter':12} {'plain tok/s':>12} {'spec tok/s':>11} {'speedup':>8} {'accept':>7} "
          f"{'tok/verify':>11}")
    for r in rows:
        print(f"{r['variant']:8} {r['drafter']:12} {r['plain_tok_s']:12.2f} {r['spec_tok_s']:11.2f} {r['speedup']:7.2f}x "
              f"{r['acceptance']:7.3f} {r['mean_accept_len']:11.2f}")
    load_after = uptime()
    print("load before:", load_before)
    print("load after: ", load_after)
    print(json.dumps({"benchmark": "speculative", "shape": args.shape, "new_tokens": args.new_tokens,
                      "k": args.k, "threads": torch.get_num_threads(), "rows": rows,
                      "uptime_before": load_before, "uptime_after": load_after, "time": time.strftime("%FT%TZ")}))


if __name__ == "__main__":
    main()
