"""Speculative decoding at batch 1: acceptance and decode tokens/s with and without it (MTP drafts, n-gram prompt
lookup).

With ``--checkpoint DIR`` (a model trained with MTP, e.g. ``deepseek-moe train --mtp-depth 1``): that model and
its tokenizer, on a real text prompt (the start of the standard library's ``textwrap.py``, ``--prompt-chars``;
the default run trains on standard-library sources, so this file may be in its training split: say so with the
numbers), drafting with its MTP module (``--k`` tokens, and 1) and with n-gram lookup, in fp32, bf16 and int8.
Without it:

A model with random weights (the tiny preset, or the mid-size model of benchmarks/common.py) in float32, bfloat16
and int8 (deepseek_moe.quant), greedy, on a repetitive prompt (a random 24-token phrase repeated four times). A
random model does not copy its prompt the way a trained one does, so the n-gram row's acceptance is low and is not
what real text gives. To show what speculation buys at a given acceptance, two more rows draft with an oracle:
the plain run's own greedy continuation, each drafted token replaced by a wrong one with probability 0.05 or
0.3 (seeded); its drafting costs nothing, like n-gram lookup. Plain and speculative runs alternate (interleaved,
``--repeats`` times) so that the load of the shared machine falls on all alike; every speculative run's greedy
tokens are checked equal to the plain run's.

Decode tokens/s leave out the prefill, as plain decoding's do; the MTP modules' pass over the prompt is prefill
work (``MTPDrafter.fill_prompts``), shown beside it (prefill ms, plain / speculative), and the last column is the
whole generation's speed-up, prefill included (the median of each repeat's ratio).

A second table gives what a step's parts cost, as multiples of one plain decode step (T = 1) at the prompt's
cache length: a verification forward of T = 2 .. k + 1 tokens and one MTP draft (depth 1 over one position, its
last logits, the argmax), in process CPU time, interleaved, with the caches rolled back after each call. A step of k drafts
costs about verify(k + 1) + k * draft, so its speed-up is (tokens per verification) / that sum; with an MoE the
verification reads the weights of every expert any of its tokens chose, which is why it is not ~1.

    python benchmarks/speculative.py [--new-tokens 48] [--repeats 2] [--k 4] [--shape mid|tiny]
    python benchmarks/speculative.py --checkpoint runs/mtp/model [--k 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from common import mid_size, uptime

from deepseek_moe.config import ModelConfig
from deepseek_moe.infer.draft import BatchDrafter, Draft, Drafter, NgramDrafter
from deepseek_moe.infer.generate import generate
from deepseek_moe.infer.mtp_draft import MTPDrafter
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


def build(cfg: ModelConfig | str, variant: str) -> DeepSeekMoEForCausalLM:
    """A random model of ``cfg``, or the checkpoint at path ``cfg``, in ``variant``."""
    if isinstance(cfg, str):
        from deepseek_moe import from_pretrained

        model = from_pretrained(cfg, dtype=torch.float32).eval()
    else:
        torch.manual_seed(0)
        model = DeepSeekMoEForCausalLM(cfg).eval()
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    elif variant == "int8":
        model = quantize_model(model, QuantConfig(bits=8))
    return model


def step_costs(model: DeepSeekMoEForCausalLM, prompt: list[int], k: int, repeats: int) -> dict[str, float]:
    """Median CPU seconds of a decode step (T=1), a verification of T=2..k+1 tokens and (with MTP modules) one
    draft, as multiples of the decode step; interleaved, each call's slots discarded so the caches keep their
    length. CPU time, not wall: on a loaded machine a short call often runs within one time slice and a longer
    one is preempted, which would skew wall-clock ratios between them."""
    g = torch.Generator().manual_seed(2)
    V = model.config.vocab_size
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        cache = model.new_cache()
        out = model(ids, cache=cache)

        def main_step(T: int) -> Callable[[], None]:
            def run() -> None:
                model(torch.randint(1, V, (1, T), generator=g), cache=cache).logits.argmax(-1).tolist()
                cache.discard(torch.ones(1, T, dtype=torch.bool))
            return run

        calls = {f"verify T={T}" if T > 1 else "decode T=1": main_step(T) for T in range(1, k + 2)}
        if len(model.mtp):
            mtp_cache = model.new_mtp_caches()[0]
            assert out.hidden is not None
            model.mtp_forward(1, out.hidden[:, :-1], ids[:, 1:], cache=mtp_cache, last_logits_only=True)
            h = out.hidden[:, -1:].clone()

            def draft() -> None:
                model.mtp_forward(1, h, torch.randint(1, V, (1, 1), generator=g), cache=mtp_cache,
                                  last_logits_only=True).logits.argmax(-1).tolist()
                mtp_cache.discard(torch.ones(1, 1, dtype=torch.bool))
            calls["draft"] = draft
        for run in calls.values():
            run()
        seconds: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, run in calls.items():
                t = time.process_time()
                run()
                seconds[name].append(time.process_time() - t)
    base = statistics.median(seconds["decode T=1"])
    return {"decode_ms": round(1000 * base, 2),
            **{name: round(statistics.median(v) / base, 3) for name, v in seconds.items() if name != "decode T=1"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--k", type=int, default=4, help="num_draft_tokens")
    ap.add_argument("--shape", choices=("mid", "tiny"), default="mid")
    ap.add_argument("--variants", default="fp32,bf16,int8")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--checkpoint", metavar="DIR", help="a trained model directory (with MTP modules for 'mtp')")
    ap.add_argument("--prompt-chars", type=int, default=600, help="with --checkpoint: the prompt's length")
    ap.add_argument("--cost-repeats", type=int, default=10, help="interleaved repeats of the step-cost table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    source: ModelConfig | str
    if args.checkpoint:
        import inspect
        import textwrap

        source = args.checkpoint
        first = build(source, "fp32")
        V = first.config.vocab_size
        prompt = first.tokenizer.encode(inspect.getsource(textwrap)[:args.prompt_chars]).ids
        shape = f"checkpoint {args.checkpoint} (mtp_depth {first.config.mtp_depth})"
        del first
    else:
        # With one MTP module, for the step-cost table (the rows here draft by n-gram and oracle).
        cfg = (mid_size() if args.shape == "mid" else get_preset("tiny")).replace(mtp_depth=1)
        source, V, shape = cfg, cfg.vocab_size, args.shape
        g = torch.Generator().manual_seed(1)
        phrase = torch.randint(1, cfg.vocab_size, (24,), generator=g).tolist()
        prompt = phrase * 4
    load_before = uptime()
    rows = []
    costs: dict[str, dict[str, float]] = {}
    for variant in args.variants.split(","):
        model = build(source, variant)
        generate(model, [prompt], max_new_tokens=4)  # warm-up
        reference = prompt + generate(model, [prompt], max_new_tokens=args.new_tokens).new_tokens[0]
        # name -> (num_draft_tokens, a fresh drafter)
        drafters: dict[str, tuple[int, Callable[[], Drafter | BatchDrafter]]] = {
            "ngram": (args.k, NgramDrafter)}
        if args.checkpoint:
            for k in sorted({1, args.k}):
                drafters[f"mtp-k{k}"] = (k, lambda m=model: MTPDrafter(m))
        else:
            for error in (0.05, 0.3):
                drafters[f"oracle-{error}"] = (args.k, lambda e=error, r=reference: OracleDrafter(r, e, V))

        plain_s: list[float] = []
        plain_prefill: list[float] = []
        spec_s: dict[str, list[float]] = {name: [] for name in drafters}
        spec_prefill: dict[str, list[float]] = {name: [] for name in drafters}
        whole: dict[str, list[float]] = {name: [] for name in drafters}  # (prefill + decode) plain / speculative
        stats = {}
        for _ in range(args.repeats):
            plain = generate(model, [prompt], max_new_tokens=args.new_tokens)
            plain_s.append(plain.decode_tokens_per_s)
            plain_prefill.append(plain.prefill_s)
            for name, (k, make) in drafters.items():
                spec = generate(model, [prompt], max_new_tokens=args.new_tokens, drafter=make(), num_draft_tokens=k)
                if spec.new_tokens != plain.new_tokens:
                    raise SystemExit(f"{variant} {name}: speculative greedy differs from plain greedy")
                spec_s[name].append(spec.decode_tokens_per_s)
                spec_prefill[name].append(spec.prefill_s)
                whole[name].append((plain.prefill_s + plain.decode_s) / (spec.prefill_s + spec.decode_s))
                stats[name] = spec.speculative
        costs[variant] = step_costs(model, prompt, args.k, args.cost_repeats)
        p = statistics.median(plain_s)
        for name in drafters:
            st = stats[name]
            s_ = statistics.median(spec_s[name])
            rows.append({"variant": variant, "drafter": name, "plain_tok_s": round(p, 2), "spec_tok_s": round(s_, 2),
                         "speedup": round(s_ / p, 2), "acceptance": round(st.acceptance_rate, 3),
                         "mean_accept_len": round(st.mean_acceptance_length, 2), "drafted": st.drafted,
                         "accepted": st.accepted,
                         "plain_prefill_ms": round(1000 * statistics.median(plain_prefill), 1),
                         "spec_prefill_ms": round(1000 * statistics.median(spec_prefill[name]), 1),
                         "speedup_with_prefill": round(statistics.median(whole[name]), 2)})
        del model
    print(f"{shape}, prompt {len(prompt)} tokens, batch 1, greedy, {args.new_tokens} new tokens, k={args.k}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved runs")
    print(f"{'variant':8} {'drafter':12} {'plain tok/s':>12} {'spec tok/s':>11} {'speedup':>8} {'accept':>7} "
          f"{'tok/verify':>11} {'prefill ms plain/spec':>22} {'with prefill':>13}")
    for r in rows:
        print(f"{r['variant']:8} {r['drafter']:12} {r['plain_tok_s']:12.2f} {r['spec_tok_s']:11.2f} "
              f"{r['speedup']:7.2f}x {r['acceptance']:7.3f} {r['mean_accept_len']:11.2f} "
              f"{r['plain_prefill_ms']:12.1f} /{r['spec_prefill_ms']:8.1f} {r['speedup_with_prefill']:12.2f}x")
    print("step parts in CPU time, as multiples of one decode step (median of interleaved repeats):")
    for variant, c in costs.items():
        print(f"{variant:8} decode {c['decode_ms']:.2f} ms CPU  " + "  ".join(f"{name} {v:.2f}x" for name, v in c.items()
                                                                    if name != "decode_ms"))
    load_after = uptime()
    print("load before:", load_before)
    print("load after: ", load_after)
    print(json.dumps({"benchmark": "speculative", "shape": shape, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
                      "k": args.k, "threads": torch.get_num_threads(), "rows": rows, "step_costs": costs,
                      "uptime_before": load_before, "uptime_after": load_after, "time": time.strftime("%FT%TZ")}))


if __name__ == "__main__":
    main()
