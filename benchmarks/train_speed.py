"""Is our training step faster than transformers' on the same checkpoint, and what does bf16 autocast buy?

One random checkpoint per size (tiny preset; the ~400M mid-size of benchmarks/common.py), written by us in the
DeepSeek-V2 layout and loaded by both: our DeepSeekMoEForCausalLM and transformers' DeepseekV2ForCausalLM (sdpa
attention; experts backend: the faster of ``eager`` and ``grouped_mm`` per dtype, measured first at the tiny size;
``grouped_mm`` at the mid size, where eager was 3-9x slower: see --try-eager). Their fp32
logits must agree before anything is timed. Then one process, interleaved rounds, the same batch for everyone:
a training step (forward with labels, backward, fused AdamW step, zero_grad) in fp32 and under bf16 autocast (fp32
master weights and optimizer state in both libraries). Tokens/s is the median over rounds. The process runs with
malloc keeping freed memory, as ``deepseek-moe train`` does (``deepseek_moe.device.keep_freed_memory``; the same
for both libraries: it is the process's allocator, not the model's), unless ``--malloc-defaults``.

transformers' ``batched_mm`` backend is left out: it gathers one (F, D) weight matrix per (token, expert) pair,
(T*K, F, D) -- 17 GB per projection at the mid size's 1024 x 6 assignments.

    python benchmarks/train_speed.py [--sizes tiny mid] [--rounds 3] [--threads 2] [--malloc-defaults]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mid_size, uptime  # noqa: E402

import deepseek_moe as dm  # noqa: E402
from deepseek_moe.config import ModelConfig  # noqa: E402
from deepseek_moe.nn.compute_copy import attach as attach_compute_copies  # noqa: E402
from deepseek_moe.presets import tiny  # noqa: E402
from deepseek_moe.train.optim import adamw_class  # noqa: E402

SIZES: dict[str, tuple[Callable[[], ModelConfig], int, int]] = {  # config, batch, sequence length
    "tiny": (tiny, 16, 256),  # the default run's micro-batch
    "mid": (mid_size, 4, 256),  # pinned by issue 14
}


def write_checkpoint(cfg: ModelConfig, path: Path) -> None:
    torch.manual_seed(0)
    model = dm.DeepSeekMoEForCausalLM(cfg)
    fmt = dm.save_pretrained(model, path)
    if fmt not in ("deepseek_v2", "deepseek_v3"):
        raise SystemExit(f"{cfg} saves as {fmt!r}, which transformers cannot load")


def load_ours(path: Path, compute_copies: bool) -> torch.nn.Module:
    model = dm.from_pretrained(path, dtype=torch.float32).train()
    # As deepseek-moe train does under bf16 autocast. The fp32 step shares this model and its AdamWCopies, so it
    # also writes the bf16 copies (2 bytes a weight in a ~30-byte optimizer pass); the trainer's fp32 runs don't.
    if compute_copies:
        attach_compute_copies(model, torch.bfloat16)
    return model


def load_hf(path: Path, experts: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                 experts_implementation=experts)
    return model.train()


def check_logits(ours: torch.nn.Module, hf: torch.nn.Module, batch: torch.Tensor) -> float:
    """Largest |logit difference| in fp32 eval mode; raises when the two models are not the same model."""
    ours.eval()
    hf.eval()
    with torch.no_grad():
        a = ours(batch[:2, :64]).logits.float()
        b = hf(batch[:2, :64]).logits.float()
    ours.train()
    hf.train()
    diff = (a - b).abs().max().item()
    if diff > 1e-3 * max(a.abs().max().item(), 1.0):
        raise SystemExit(f"logits disagree (max |diff| {diff:.3g}): not the same model, nothing to compare")
    return diff


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """Fused AdamW as our Trainer's (its AdamWCopies, the same update, where the model has compute copies)."""
    return adamw_class(model)(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)


class Stepper:
    """One training step of one model at one precision. A model's fp32 and bf16 steppers share its AdamW (the
    step's work is the same; a second set of moments would cost 3.2 GB at the mid size)."""

    def __init__(self, model: torch.nn.Module, amp: bool, opt: torch.optim.AdamW | None = None) -> None:
        self.model, self.amp = model, amp
        self.opt = opt if opt is not None else adamw(model)

    def context(self) -> AbstractContextManager[Any]:
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.amp else nullcontext()

    def __call__(self, batch: torch.Tensor) -> tuple[float, float]:
        t0 = time.perf_counter()
        with self.context():
            loss = self.model(batch, labels=batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, loss.item()


def bench_size(name: str, rounds: int, workdir: Path, experts_backends: tuple[str, ...],
               compute_copies: bool = True) -> dict[str, Any]:
    make_cfg, B, S = SIZES[name]
    cfg = make_cfg()
    path = workdir / name
    write_checkpoint(cfg, path)
    batch = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
    ours = load_ours(path, compute_copies)
    hf = load_hf(path, "grouped_mm")
    diff = check_logits(ours, hf, batch)
    print(f"\n{name}: {dm.count_parameters(cfg)[0] / 1e6:.0f}M parameters, batch {B} x {S}; fp32 logits agree "
          f"(max |diff| {diff:.2e})")

    # transformers' fastest experts backend per dtype: one warm step each, then the faster of two timed ones.
    backends = {False: "grouped_mm", True: "grouped_mm"}
    for amp in (False, True) if len(experts_backends) > 1 else ():
        times = {}
        for experts in experts_backends:
            hf.set_experts_implementation(experts)
            step = Stepper(hf, amp)
            step(batch)
            times[experts] = min(step(batch)[0] for _ in range(2 if name == "tiny" else 1))
        backends[amp] = min(times, key=times.__getitem__)
        print(f"  transformers {'bf16' if amp else 'fp32'} experts backends, s/step: "
              + ", ".join(f"{k} {v:.3f}" for k, v in times.items()) + f" -> {backends[amp]}")

    runs = {"ours fp32": (ours, False), "ours bf16": (ours, True),
            "transformers fp32": (hf, False), "transformers bf16": (hf, True)}
    optimizers = {id(ours): adamw(ours), id(hf): adamw(hf)}
    steppers = {label: Stepper(model, amp, optimizers[id(model)]) for label, (model, amp) in runs.items()}
    times: dict[str, list[float]] = {label: [] for label in runs}
    losses: dict[str, float] = {}
    for label, step in steppers.items():  # warm-up: allocations, autocast's weight casts, the optimizer state
        if runs[label][0] is hf:
            hf.set_experts_implementation(backends[runs[label][1]])
        step(batch)
    for _ in range(rounds):
        for label, step in steppers.items():
            if runs[label][0] is hf:
                hf.set_experts_implementation(backends[runs[label][1]])
            t, losses[label] = step(batch)
            times[label].append(t)
    tok_s = {label: B * S / statistics.median(t) for label, t in times.items()}
    rows = {label: {"tokens_per_s": tok_s[label], "step_s": statistics.median(times[label]),
                    "loss_last": losses[label]} for label in runs}
    for amp in (False, True):
        rows[f"transformers {'bf16' if amp else 'fp32'}"]["experts"] = backends[amp]
    ratios = {"ours_bf16_over_transformers_bf16": tok_s["ours bf16"] / tok_s["transformers bf16"],
              "ours_bf16_over_ours_fp32": tok_s["ours bf16"] / tok_s["ours fp32"],
              "ours_fp32_over_transformers_fp32": tok_s["ours fp32"] / tok_s["transformers fp32"]}
    print(f"  {'':20s} {'tokens/s':>10s} {'s/step':>8s}")
    for label in runs:
        print(f"  {label:20s} {tok_s[label]:10,.0f} {rows[label]['step_s']:8.3f}")
    for key, value in ratios.items():
        print(f"  {key}: {value:.2f}x")
    del ours, hf, steppers, optimizers
    return {"params_M": dm.count_parameters(cfg)[0] / 1e6, "batch": [B, S], "logits_max_diff": diff,
            "rows": rows, "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "mid"])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--try-eager", action="store_true", help="also try transformers' eager experts at the mid size "
                    "(2026-11-23: 29 s fp32 / 61 s bf16 per step there against grouped_mm's 9.0 / 6.6, so off)")
    ap.add_argument("--malloc-defaults", action="store_true",
                    help="leave glibc malloc's defaults (freed large blocks go back to the kernel)")
    ap.add_argument("--no-compute-copies", action="store_true",
                    help="ours without bf16 compute copies (autocast casts every weight each forward, torch's AdamW)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from deepseek_moe.device import cpu_bf16_feature, keep_freed_memory

    kept = False if args.malloc_defaults else keep_freed_memory()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
                "cpu_bf16": cpu_bf16_feature(), "threads": torch.get_num_threads(), "keep_freed_memory": kept,
                "compute_copies": not args.no_compute_copies}
    print(uptime())
    print(" ".join(f"{k} {v}" for k, v in versions.items()))
    results = {}
    with tempfile.TemporaryDirectory(prefix="train_speed-") as tmp:
        for name in args.sizes:
            backends = ("eager", "grouped_mm") if name == "tiny" or args.try_eager else ("grouped_mm",)
            results[name] = bench_size(name, args.rounds, Path(tmp), backends, not args.no_compute_copies)
    print(uptime())
    print(json.dumps({"benchmark": "train_speed", "versions": versions, "rounds": args.rounds, "sizes": results,
                      "uptime": uptime()}))


if __name__ == "__main__":
    main()
