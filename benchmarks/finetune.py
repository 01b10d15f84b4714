"""Fine-tuning speed and memory: LoRA on an int8 DeepSeek-V2-Lite, and ours against PEFT on transformers.

``v2lite``: the V2-Lite shape (dim 2048, 64 routed + 2 shared experts of 1408, top-6, kv-LoRA 512, vocabulary
102400; ``--layers`` of its 27) with random weights built directly in int8, module by module (the model is
allocated on the meta device, its targets swapped for quantised twins, then each tensor filled in place: no
float copy of a weight ever exists; the frozen embedding table in int8 codes, as ``finetune --quantize`` keeps it), LoRA r=16 on attention + shared + routed experts, AdamW on the adapters, one
sequence of ``--seq-len`` tokens a step. Each layer count runs in a fresh process, so its VmHWM is its own;
given two or more counts, the per-MoE-layer cost (slope) extrapolates to all 27 layers. Tokens/s: the median of
the timed steps after one warm-up step. ``--checkpointing`` none | attention | full (the flag alone: full),
``--plain-experts``: the routed experts' LoRA through plain autograd (the reference) instead of
adapters/quant_experts.py; ``--expert-activations bfloat16``: that function keeping bf16 pre-activations. ``v2modes``: those settings alternated on one model in one process (time ratios under
load).

``mid``: the ~400M mid-size model of benchmarks/common.py with a bf16 base, LoRA r=16 (alpha 32) on attention and
the routed experts (the groups PEFT can target on transformers 5's DeepSeek-V2; it rewrites shared-expert names
into the routed experts), ours against transformers' DeepseekV2ForCausalLM + PEFT (grouped_mm experts, sdpa),
interleaved rounds on the same batch; fp32 logits of the two base models must agree before anything is timed.

``qgrad``: the backward's dx = dy @ dequant(W) for int8 codes (what every frozen layer of a quantised base
passes to the adapters below it), the C++ kernel against the tiled dequantise-then-matmul twin, at V2-Lite's
expert and attention shapes, 1 thread by default, CPU time of interleaved rounds.

``qfwd``: the forward's y = x @ dequant(W)^T for int8 (or int4) codes and fp32 x at decode and training row
counts, the kernel's decode tiles against its strip path (interleaved, 2 threads, CPU time over threads or wall
time), and one MoE layer's expert products as a per-expert loop against one grouped call.

    python benchmarks/finetune.py v2lite --layers 2 4 [--steps 3] [--seq-len 512] [--bits 8] [--checkpointing MODE] [--moments bfloat16]
        [--malloc keep|default|release]
    python benchmarks/finetune.py v2modes --layers 3 [--rounds 2] [--modes none attention full none/plain]
    python benchmarks/finetune.py mid [--rounds 3]
    python benchmarks/finetune.py qgrad [--rows 8 32 64] [--threads 1]
    python benchmarks/finetune.py qfwd [--rows 1 4 8 16 48 512] [--threads 2] [--bits 8] [--clock cpu]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mid_size, uptime, v2_lite, vm_hwm_bytes  # noqa: E402

import deepseek_moe as dm  # noqa: E402
from deepseek_moe.adapters import (  # noqa: E402
    LoRAConfig,
    apply_lora,
    mark_trainable,
    narrow_frozen_embedding,
    narrow_frozen_matrices,
    set_saved_activations,
)
from deepseek_moe.kernels.float_matmul import torch_bf16_matmul_is_native  # noqa: E402
from deepseek_moe.model.block import CHECKPOINTING_MODES  # noqa: E402
from deepseek_moe.train.narrow_moments import NarrowMomentsAdamW  # noqa: E402

V2_LITE_LAYERS = 27
TARGETS = ("attention", "shared_experts", "routed_experts")


def cpu_info() -> dict[str, Any]:
    """CPU model, its SIMD flags that matter here, and the quantised kernel's instruction set."""
    from deepseek_moe.kernels.quant_matmul import kernel_report

    model, flags = "?", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and model == "?":
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    wanted = sorted(f for f in flags if f in ("avx2", "fma", "f16c") or f.startswith(("avx512", "amx", "avx_vnni")))
    return {"cpu": model, "flags": wanted, "quant_kernel": kernel_report()["quant_matmul"],
            "threads": torch.get_num_threads()}


# ---- (a) V2-Lite, int8 base ------------------------------------------------------------------------------------
def build_quantised(cfg: dm.ModelConfig, bits: int, seed: int = 0) -> dm.DeepSeekMoEForCausalLM:
    """cfg's model with random weights held quantised from the start: built on meta, twins swapped in, then each
    module's tensors allocated and filled in place (codes as random integers, scales giving weights of std ~0.02)."""
    from deepseek_moe.io.streaming import finish_runtime_state
    from deepseek_moe.quant import QuantConfig, prepare_model

    with torch.device("meta"):
        model = dm.DeepSeekMoEForCausalLM(cfg)
    prepare_model(model, QuantConfig(bits=bits))  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        module.to_empty(device="cpu", recurse=False)
        with torch.no_grad():
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if t.dtype == torch.int8:
                    t.random_(-127, 128, generator=gen)
                elif t.dtype == torch.uint8:
                    t.random_(0, 256, generator=gen)
                elif name.endswith("_scale"):  # codes have std ~73 (int8) / ~4.6 (int4)
                    t.fill_(0.02 / (73.0 if t.dtype == torch.float32 else 4.6))
                elif "norm" in type(module).__name__.lower():
                    t.fill_(1.0)
                else:
                    t.normal_(0.0, 0.02, generator=gen)
    finish_runtime_state(model, torch.device("cpu"))
    return model


def reset_vm_hwm() -> None:
    """Start VmHWM afresh at the current resident set (Linux: clear_refs 5), so a later reading is the peak of
    what ran since, not of building the model."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def lora_v2lite(layers: int, bits: int, seq_len: int) -> tuple[dm.DeepSeekMoEForCausalLM, list[torch.Tensor],
                                                                  torch.Tensor]:
    """(model with LoRA, its trainable tensors, one sequence of token ids)."""
    cfg = v2_lite().replace(n_layers=layers)
    model = build_quantised(cfg, bits)
    torch.manual_seed(0)
    apply_lora(model, LoRAConfig(r=16, alpha=32.0, targets=TARGETS))
    trainable = [p for n, p in model.named_parameters() if n in set(mark_trainable(model))]
    narrow_frozen_embedding(model, torch.int8)  # as finetune --quantize does: 0.21 GB, not 0.84
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))
    return model.train(), trainable, ids


def set_compact_experts(model: torch.nn.Module, compact: bool) -> None:
    """The routed experts' LoRA through the compact function (adapters/quant_experts.py) or plain autograd."""
    from deepseek_moe.adapters.lora import ExpertLoRA

    for m in model.modules():
        if isinstance(m, ExpertLoRA):
            m.compact = compact


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> tuple[float, float]:
    """(seconds, loss) of one AdamW step on ``ids``."""
    t0 = time.perf_counter()
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, loss.item()


def run_v2lite_once(layers: int, bits: int, steps: int, seq_len: int, checkpointing: str,
                    compact: bool = True, expert_activations: str = "float32",
                    moments: str = "float32", malloc: str = "default") -> dict[str, Any]:
    from deepseek_moe.device import keep_freed_memory, release_freed_memory
    from deepseek_moe.model.block import set_activation_checkpointing

    if malloc != "default":  # as the Trainer's keep_freed_memory sets it, before anything is allocated
        (release_freed_memory if malloc == "release" else keep_freed_memory)()
    t0 = time.perf_counter()
    model, trainable, ids = lora_v2lite(layers, bits, seq_len)
    build_s = time.perf_counter() - t0
    built_rss = vm_hwm_bytes()
    reset_vm_hwm()  # from here VmHWM is the training steps' peak, not the build's
    set_activation_checkpointing(model, checkpointing)
    set_compact_experts(model, compact)
    set_saved_activations(model, expert_activations)
    opt = (torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0) if moments == "float32"  # betas (0.9, 0.999)
           else NarrowMomentsAdamW(trainable, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95)))  # 0.999 is refused
    times, losses = [], []
    for _ in range(steps + 1):
        dt, loss = train_step(model, opt, ids)
        times.append(dt)
        losses.append(loss)
        progress(f"{layers} layers: step {len(times)} {times[-1]:.1f} s, VmHWM {vm_hwm_bytes() / 1e9:.2f} GB")
    step_s = statistics.median(times[1:])
    return {"layers": layers, "bits": bits, "seq_len": seq_len, "steps": steps, "build_s": round(build_s, 1),
            "rss_built_gb": round(built_rss / 1e9, 2), "vm_hwm_gb": round(max(built_rss, vm_hwm_bytes()) / 1e9, 2),
            "train_hwm_gb": round(vm_hwm_bytes() / 1e9, 2),
            "trainable_m": round(sum(p.numel() for p in trainable) / 1e6, 1), "step_s": round(step_s, 2),
            "tokens_per_s": round(seq_len / step_s, 2), "losses": [round(x, 3) for x in losses],
            "activation_checkpointing": checkpointing, "compact_experts": compact,
            "expert_activations": expert_activations, "moments": moments, "malloc": malloc,
            "thp": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"}


def v2lite(args: argparse.Namespace) -> None:
    if args.one is not None:  # a child: one layer count in this process
        print(json.dumps(run_v2lite_once(args.one, args.bits, args.steps, args.seq_len, args.checkpointing,
                                         not args.plain_experts, args.expert_activations, args.moments,
                                         args.malloc)))
        return
    dense = v2_lite().n_dense_layers
    if min(args.layers) <= dense:  # else the child fails after building, on a LoRA target that matches nothing
        raise SystemExit(f"--layers {min(args.layers)}: V2-Lite's first {dense} layer(s) are dense, so LoRA on "
                         f"{', '.join(TARGETS)} needs at least {dense + 1} layers")
    rows = []
    for layers in args.layers:
        cmd = [sys.executable, __file__, "v2lite", "--one", str(layers), "--bits", str(args.bits), "--steps",
               str(args.steps), "--seq-len", str(args.seq_len), "--checkpointing", args.checkpointing]
        cmd += (["--plain-experts"] if args.plain_experts else []) + ["--expert-activations", args.expert_activations]
        cmd += ["--moments", args.moments, "--malloc", args.malloc]
        # Released blocks are faulted in afresh each step: torch asks for 2 MB pages for its large ones with this
        # (read once, when the child's torch first allocates).
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1"} if args.malloc == "release" else None
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows[-1]["uptime"] = uptime()
    print(f"\nV2-Lite shape, int{args.bits} base, LoRA r=16 on {', '.join(TARGETS)}, seq {args.seq_len}, "
          f"batch 1, AdamW ({'fp32 moments, betas (0.9, 0.999)' if args.moments == 'float32' else 'bf16 moments, betas (0.9, 0.95)'}), "
          f"activation checkpointing {args.checkpointing}, malloc {args.malloc}, "
          f"{'plain' if args.plain_experts else 'compact'} expert LoRA keeping {args.expert_activations}; "
          f"{cpu_info()}")
    print(f"{'layers':>6} {'built GB':>9} {'VmHWM GB':>9} {'steps GB':>9} {'adapter M':>10} {'s/step':>7} "
          f"{'tok/s':>7}  load")
    for r in rows:
        print(f"{r['layers']:>6} {r['rss_built_gb']:>9} {r['vm_hwm_gb']:>9} {r['train_hwm_gb']:>9} {r['trainable_m']:>10} "
              f"{r['step_s']:>7} {r['tokens_per_s']:>7}  {r['uptime'].split('load average:')[-1].strip()}")
    result: dict[str, Any] = {"benchmark": "finetune_v2lite", "runs": rows, **cpu_info()}
    if len(rows) >= 2 and rows[-1]["layers"] != rows[0]["layers"]:
        a, b = rows[0], rows[-1]
        per_layer = {k: (b[k] - a[k]) / (b["layers"] - a["layers"]) for k in ("train_hwm_gb", "step_s")}
        more = V2_LITE_LAYERS - b["layers"]
        hwm = b["train_hwm_gb"] + more * per_layer["train_hwm_gb"]  # the steps' peak, above the build's
        step = b["step_s"] + more * per_layer["step_s"]
        result["extrapolated_27_layers"] = {"vm_hwm_gb": round(hwm, 1), "step_s": round(step, 1),
                                            "tokens_per_s": round(args.seq_len / step, 1),
                                            "per_moe_layer": {k: round(v, 3) for k, v in per_layer.items()}}
        print(f"extrapolated to 27 layers (+{per_layer['train_hwm_gb']:.2f} GB, +{per_layer['step_s']:.2f} s a MoE "
              f"layer): VmHWM ~{hwm:.1f} GB, ~{step:.0f} s/step, ~{args.seq_len / step:.1f} tokens/s")
    print(json.dumps(result))


def v2modes(args: argparse.Namespace) -> None:
    """Step time of each checkpointing mode (and plain vs compact expert LoRA) on one model in one process,
    the modes alternated round by round, so a loaded machine slows them alike: ratios, not capacity."""
    from deepseek_moe.model.block import set_activation_checkpointing

    model, trainable, ids = lora_v2lite(args.layers, args.bits, args.seq_len)
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    train_step(model, opt, ids)  # warm-up: AdamW's state, first-touch pages
    times: dict[str, list[float]] = {m: [] for m in args.modes}
    for r in range(args.rounds):
        for mode in args.modes:
            ckpt, _, variant = mode.partition("/")
            set_activation_checkpointing(model, ckpt)
            set_compact_experts(model, variant != "plain")
            set_saved_activations(model, "bfloat16" if variant == "bf16" else "float32")
            times[mode].append(train_step(model, opt, ids)[0])
            progress(f"round {r + 1} {mode}: {times[mode][-1]:.1f} s")
    load = uptime()
    base = statistics.median(times[args.modes[0]])
    print(f"\nV2-Lite shape, {args.layers} layers, int{args.bits} LoRA r=16, seq {args.seq_len}; {args.rounds} "
          f"alternating rounds; {load}")
    print(f"{'mode':>16} {'s/step':>8} {'vs ' + args.modes[0]:>10}")
    for mode, t in times.items():
        print(f"{mode:>16} {statistics.median(t):>8.2f} {statistics.median(t) / base:>10.2f}")
    print(json.dumps({"benchmark": "finetune_v2modes", "layers": args.layers, "seq_len": args.seq_len,
                      "step_s": {k: [round(x, 2) for x in v] for k, v in times.items()}, "uptime": load,
                      **cpu_info()}))


# ---- (b) mid size, bf16 base: ours against PEFT ------------------------------------------------------------------
class Stepper:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.train()
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def __call__(self, batch: torch.Tensor) -> float:
        t0 = time.perf_counter()
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def mid(args: argparse.Namespace) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    cfg = mid_size()
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        dm.save_pretrained(dm.DeepSeekMoEForCausalLM(cfg), tmp)
        ours = dm.from_pretrained(tmp, dtype=torch.float32).eval()
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa",
                                                  experts_implementation="grouped_mm").eval()
    with torch.no_grad():
        diff = (ours(batch[:1, :64]).logits - hf(batch[:1, :64]).logits).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"fp32 logits disagree (max |diff| {diff:.3g}): not the same model")
    dtype = getattr(torch, args.dtype)
    # A bf16 base: where torch's bf16 matmul is not native, ours keeps the frozen matrices in bf16 and computes in
    # fp32 (adapters/frozen_base.py), as `finetune --quantize bf16` does; elsewhere both models are cast whole.
    widen = dtype == torch.bfloat16 and not torch_bf16_matmul_is_native()
    ours_base = "bf16 matrices, fp32 compute" if widen else args.dtype
    if not widen:
        ours.to(dtype)
    hf.to(dtype)
    torch.manual_seed(0)
    apply_lora(ours, LoRAConfig(r=16, alpha=32.0, targets=("attention", "routed_experts")))
    mark_trainable(ours)
    if widen:
        narrow_frozen_matrices(ours, dtype)
    attention = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    lcfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=attention,
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    theirs = peft.get_peft_model(hf, lcfg)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    steppers = {"ours": Stepper(ours), "peft": Stepper(theirs)}
    for name, s in steppers.items():
        progress(f"warm-up {name}: {s(batch):.1f} s")
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for r in range(args.rounds):
        for name, s in steppers.items():
            times[name].append(s(batch))
            progress(f"round {r + 1} {name}: {times[name][-1]:.1f} s")
    tokens = batch.numel()
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    load = uptime()
    print(f"\nmid size ({dm.count_parameters(cfg)[0] / 1e6:.0f}M), {args.dtype} base (ours: {ours_base}), LoRA r=16 on attention + routed experts "
          f"(trainable: ours {n_ours / 1e6:.1f}M, PEFT {n_theirs / 1e6:.1f}M), batch {args.batch} x {args.seq_len}, "
          f"{args.rounds} interleaved rounds; fp32 logits agree ({diff:.1e}); {cpu_info()}")
    print(f"{'':6} {'s/step (median)':>16} {'tokens/s':>9}")
    for k, v in times.items():
        print(f"{k:6} {statistics.median(v):>16.2f} {tps[k]:>9.1f}")
    print(f"ours / PEFT: {tps['ours'] / tps['peft']:.2f}x   ({load})")
    print(json.dumps({"benchmark": "finetune_mid_vs_peft", "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
                      "ratio": round(tps["ours"] / tps["peft"], 2), "dtype": args.dtype, "ours_base": ours_base, "trainable": {"ours": n_ours, "peft": n_theirs},
                      "batch": args.batch, "seq_len": args.seq_len, "rounds": args.rounds,
                      "step_s": {k: [round(x, 2) for x in v] for k, v in times.items()}, "uptime": load,
                      **cpu_info()}))


# ---- (c) the backward's transposed int8 product: kernel against the tiled twin ------------------------------------
def qgrad(args: argparse.Namespace) -> None:
    """dx = dy @ dequant(W) at V2-Lite's expert and attention shapes: the C++ kernel (kernels/quant_transposed.py)
    against the tiled dequantise-then-matmul twin it replaced, interleaved rounds, CPU time, median."""
    from deepseek_moe.kernels import quant_transposed as qt
    from deepseek_moe.quant import pack

    def per_call(f: Any) -> float:
        f()
        t0 = time.process_time()
        for _ in range(args.reps):
            f()
        return (time.process_time() - t0) / args.reps

    # (N, K) of W: expert w1/w3 and w2, then MLA's q_proj, kv_b_proj, o_proj and kv_a_proj_with_mqa (V2-Lite).
    shapes = [(1408, 2048), (2048, 1408), (3072, 2048), (4096, 512), (2048, 2048), (576, 2048)]
    rows = []
    for N, K in shapes:
        q, s = pack.quantize_int8(torch.randn(N, K))
        for M in args.rows:
            dy = torch.randn(M, N)
            t: dict[str, list[float]] = {"tiled": [], "kernel": []}
            for _ in range(args.rounds):
                t["tiled"].append(per_call(lambda dy=dy, q=q, s=s: qt.input_grad_reference(dy, q, s)))
                t["kernel"].append(per_call(lambda dy=dy, q=q, s=s: qt.input_grad(dy, q, s)))
            med = {k: statistics.median(v) for k, v in t.items()}
            rows.append({"N": N, "K": K, "M": M, "tiled_us": round(med["tiled"] * 1e6), "kernel_us":
                         round(med["kernel"] * 1e6), "kernel_gb_s": round(N * K / med["kernel"] / 1e9, 2),
                         "speedup": round(med["tiled"] / med["kernel"], 2)})
    load = uptime()
    print(f"\ndx = dy (M, N) @ dequant(W (N, K)), int8, {torch.get_num_threads()} thread(s), CPU time, median of "
          f"{args.rounds} interleaved rounds; {cpu_info()}")
    print(f"{'N x K':>11} {'M':>4} {'tiled us':>9} {'kernel us':>10} {'GB/s codes':>11} {'speedup':>8}")
    for r in rows:
        print(f"{str(r['N']) + 'x' + str(r['K']):>11} {r['M']:>4} {r['tiled_us']:>9} {r['kernel_us']:>10} "
              f"{r['kernel_gb_s']:>11} {r['speedup']:>7}x")
    print(f"({load})")
    print(json.dumps({"benchmark": "finetune_qgrad", "rows": rows, "uptime": load, **cpu_info()}))


# ---- (d) the forward's int8 product at training row counts: the strip path against the decode tiles ---------------
def qfwd(args: argparse.Namespace) -> None:
    """y = x @ dequant(W)^T with int8 codes and fp32 x (each frozen layer's forward), the kernel's decode tiles
    (quant_matmul.set_strip_rows(huge)) against its strip path (set_strip_rows(1)), interleaved rounds, median; each call takes the next of enough matrices (--mb) that the codes stream from memory as in a step.
    Then one V2-Lite MoE layer's expert product (64 experts, --tokens x 6 rows routed uniformly): one
    quant_matmul per expert (the loop quant/grad.py had) against one quant_matmul_grouped call, each at the
    default threshold."""
    from deepseek_moe.kernels import quant_matmul as qm
    from deepseek_moe.quant import pack

    # --clock cpu: the process's CPU time over the thread count, threads sleeping while they wait (main() sets
    # OMP_WAIT_POLICY=PASSIVE). On a shared machine the wall time of a 2-thread call mostly measures when the
    # scheduler gives both threads a core at once (a call waits a time slice for a preempted thread), and a
    # spinning thread's CPU time does the same.
    clock, per = (time.process_time, args.threads) if args.clock == "cpu" else (time.perf_counter, 1)

    def gflops(f: Any, flop: float) -> float:
        f()
        t0 = clock()
        for _ in range(args.reps):
            f()
        return flop * args.reps / ((clock() - t0) / per) / 1e9

    default = qm.strip_rows()
    rows: list[dict[str, Any]] = []
    def codes(N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        if args.bits == 8:
            return pack.quantize_int8(torch.randn(N, K))
        packed, s = pack.quantize_int4(torch.randn(N, K), args.group)
        return pack.repack_int4_for_kernel(packed, args.group), s

    for N, K in ((1408, 2048), (2048, 1408)):
        mats = [codes(N, K) for _ in range(max(1, args.mb * 2**20 * 8 // (N * K * args.bits)))]
        turn = itertools.count()
        for M in args.rows:
            x = torch.randn(M, K)

            def call(x: torch.Tensor = x, mats: list = mats, turn: Iterator[int] = turn) -> None:
                q, s = mats[next(turn) % len(mats)]
                qm.quant_matmul(x, q, s)

            t: dict[str, list[float]] = {"decode": [], "strip": []}
            for _ in range(args.rounds):
                for name, threshold in (("decode", 1 << 40), ("strip", 1)):
                    qm.set_strip_rows(threshold)
                    t[name].append(gflops(call, 2 * M * N * K))
            med = {k: statistics.median(v) for k, v in t.items()}
            rows.append({"N": N, "K": K, "M": M, "decode_gflops": round(med["decode"], 1),
                         "strip_gflops": round(med["strip"], 1), "ratio": round(med["strip"] / med["decode"], 2)})
    qm.set_strip_rows(default)
    E, N, K = 64, 1408, 2048
    q_E = torch.randint(-127, 128, (E, N, K), dtype=torch.int8)
    s_E = torch.rand(E, N) * 1e-2
    counts = torch.randint(0, E, (args.tokens * 6,)).bincount(minlength=E).tolist()
    x = torch.randn(sum(counts), K)
    layer: dict[str, list[float]] = {"loop": [], "grouped": []}
    for _ in range(args.rounds):
        layer["loop"].append(gflops(lambda: qm.quant_matmul_grouped_reference(x, q_E, s_E, counts), 2 * x.shape[0] * N * K))
        layer["grouped"].append(gflops(lambda: qm.quant_matmul_grouped(x, q_E, s_E, counts), 2 * x.shape[0] * N * K))
    grouped = {k: round(statistics.median(v), 1) for k, v in layer.items()}
    load = uptime()
    kind = "int8" if args.bits == 8 else f"int4 (groups of {args.group})"
    print(f"\ny = x (M, K) @ dequant(W (N, K))^T, {kind} codes, fp32 x, {torch.get_num_threads()} thread(s), GFLOP/s "
          f"({'CPU time / threads' if args.clock == 'cpu' else 'wall time'}), median of {args.rounds} interleaved rounds; strip path from {default} rows by default; {cpu_info()}")
    print(f"{'N x K':>11} {'M':>4} {'decode tiles':>13} {'strip':>7} {'ratio':>6}")
    for r in rows:
        print(f"{str(r['N']) + 'x' + str(r['K']):>11} {r['M']:>4} {r['decode_gflops']:>13} {r['strip_gflops']:>7} "
              f"{r['ratio']:>5}x")
    print(f"one layer's int8 experts ({E} x {N}x{K}, {x.shape[0]} rows, {min(counts)}-{max(counts)} an expert): "
          f"per-expert loop {grouped['loop']} GFLOP/s, grouped call {grouped['grouped']} GFLOP/s")
    print(f"({load})")
    print(json.dumps({"benchmark": "finetune_qfwd", "codes": kind, "rows": rows, "strip_rows": default,
                      "layer_gflops": grouped,
                      "clock": args.clock,
                      "uptime": load, **cpu_info()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("v2lite")
    a.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="layer counts, each in its own process")
    a.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    a.add_argument("--bits", type=int, choices=(8, 4), default=8)
    a.add_argument("--steps", type=int, default=3)
    a.add_argument("--seq-len", type=int, default=512)
    a.add_argument("--checkpointing", nargs="?", const="full", default="none", choices=CHECKPOINTING_MODES,
                   help="activation checkpointing mode (the flag alone: full)")
    a.add_argument("--plain-experts", action="store_true",
                   help="the routed experts' LoRA through plain autograd, not the compact function")
    a.add_argument("--malloc", choices=("default", "keep", "release"), default="keep",
                   help="glibc malloc's freed memory: kept in the heap (default, as the Trainer and deepseek-moe "
                   "finetune keep it), its own defaults, or released at once (device.release_freed_memory; the "
                   "children get THP_MEM_ALLOC_ENABLE=1)")
    a.add_argument("--moments", choices=("float32", "bfloat16"), default="float32",
                   help="AdamW's moments: bfloat16 as DeepSeek-V3 (train/narrow_moments.py, betas (0.9, 0.95))")
    a.add_argument("--expert-activations", choices=("float32", "bfloat16"), default="float32",
                   help="what the compact expert LoRA keeps its gate/up pre-activations in")
    m = sub.add_parser("v2modes")
    m.add_argument("--layers", type=int, default=3)
    m.add_argument("--rounds", type=int, default=2)
    m.add_argument("--bits", type=int, choices=(8, 4), default=8)
    m.add_argument("--seq-len", type=int, default=512)
    m.add_argument("--modes", nargs="+", default=["none", "attention", "full", "none/plain"],
                   help="checkpointing modes; /plain: with the plain expert LoRA, /bf16: keeping bf16 pre-activations")
    b = sub.add_parser("mid")
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--batch", type=int, default=2)
    b.add_argument("--seq-len", type=int, default=256)
    b.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="the base's dtype")
    c = sub.add_parser("qgrad")
    c.add_argument("--rows", type=int, nargs="+", default=[8, 32, 64, 512],
                   help="rows of dy (an expert's tokens; 512: a dense layer's at seq 512)")
    c.add_argument("--rounds", type=int, default=5)
    c.add_argument("--reps", type=int, default=5)
    c.add_argument("--threads", type=int, default=1)
    d = sub.add_parser("qfwd")
    d.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 48, 512], help="rows of x")
    d.add_argument("--rounds", type=int, default=5)
    d.add_argument("--reps", type=int, default=5)
    d.add_argument("--mb", type=int, default=48, help="megabytes of codes cycled through (beyond the L3 cache)")
    d.add_argument("--tokens", type=int, default=512, help="tokens of the layer product (6 experts each)")
    d.add_argument("--bits", type=int, choices=(8, 4), default=8, help="codes of the per-shape table")
    d.add_argument("--group", type=int, default=64, help="int4 group size")
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="CPU time over the threads (a shared machine) or wall time (an idle one)")
    args = p.parse_args()
    if args.what == "qfwd" and args.clock == "cpu" and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        # Waiting threads must sleep, not spin, for CPU time to count work; OpenMP reads this when torch loads it.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    threads = args.threads if args.what in ("qgrad", "qfwd") else min(2, torch.get_num_threads())
    torch.set_num_threads(threads)
    {"v2lite": v2lite, "v2modes": v2modes, "mid": mid, "qgrad": qgrad, "qfwd": qfwd}[args.what](args)


if __name__ == "__main__":
    main()
