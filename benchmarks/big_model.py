"""DeepSeek-V2-Lite-shaped (or mid-size) model, quantised, on this CPU: load, memory, prefill, decode.

Writes a checkpoint of the shape with random weights directly in the quantised format (so no 31 GB bf16
file is needed), then in a fresh process for each measurement: load time with a cold page cache (the file's
pages dropped with posix_fadvise) and a warm one, peak RSS (VmHWM, file pages included) growth over the load,
prefill tokens/s for a 512-token prompt, decode tokens/s at batch 1 and 8. Also measures this machine's memory
read bandwidth and prints the bandwidth-bound decode ceiling (weights read per token / bandwidth) and the
fraction reached.

    python benchmarks/big_model.py --model v2-lite --bits 8 --dir /tmp/v2lite-int8      # ~16 GB file, ~17 GB RSS
    python benchmarks/big_model.py --model mid --bits 4 --dir /tmp/mid-int4

With ``--compare`` (mid-size): one bf16 checkpoint of random weights, and side by side, interleaved in one
process: ours fp32 / bf16 / int8 / int4 (quantised on load from that checkpoint; the quantised ones once per
kernel activation format, int8 and fp32) and transformers fp32 / bf16 on the same checkpoint: prefill 64 tokens
and decode at batch 1.

    python benchmarks/big_model.py --compare --no-transformers --models int8,int4 --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (  # noqa: E402
    mid_size,
    read_bandwidth_gbs,
    uptime,
    v2_lite,
    vm_hwm_bytes,
    weights_read_per_token,
    write_random_checkpoint,
)

MODELS = {"v2-lite": v2_lite, "mid": mid_size}


def drop_file_cache(directory: Path) -> None:
    for f in directory.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child(args: argparse.Namespace) -> None:
    """One fresh process: load, then (unless --load-only) prefill and decode. Prints one JSON line."""
    import torch

    import deepseek_moe as dm

    base = vm_hwm_bytes()
    t0 = time.perf_counter()
    model = dm.from_pretrained(args.dir, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    out: dict[str, object] = {"load_s": load_s, "hwm_import": base, "hwm_load": vm_hwm_bytes()}
    if not args.load_only:
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            prompt = torch.randint(0, vocab, (1, args.prefill), generator=g)
            model(prompt[:, :8])  # warm-up (kernel build, allocator)
            t0 = time.perf_counter()
            model(prompt)
            out["prefill_tok_s"] = args.prefill / (time.perf_counter() - t0)
            for batch in (1, 8):
                ids = torch.randint(0, vocab, (batch, 16), generator=g)
                cache = model.new_cache()
                logits = model(ids, cache=cache).logits
                tok = logits[:, -1:].argmax(-1)
                for _ in range(2):  # warm-up steps
                    tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)
                t0 = time.perf_counter()
                for _ in range(args.tokens):
                    tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)
                out[f"decode_b{batch}_tok_s"] = batch * args.tokens / (time.perf_counter() - t0)
                out[f"weights_per_token_b{batch}"] = weights_read_per_token(model, batch)
        out["hwm_end"] = vm_hwm_bytes()
    print("RESULT " + json.dumps(out), flush=True)


def run_child(args: argparse.Namespace, *, load_only: bool) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", "--dir", str(args.dir), "--dtype", args.dtype,
           "--tokens", str(args.tokens), "--prefill", str(args.prefill)] + (["--load-only"] if load_only else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def headline(args: argparse.Namespace) -> None:
    cfg = MODELS[args.model]()
    directory = Path(args.dir)
    print(uptime())
    if not (directory / "config.json").is_file():
        t0 = time.perf_counter()
        size = write_random_checkpoint(cfg, directory, bits=args.bits, dtype=args.dtype)
        print(f"wrote {directory} ({size / 1e9:.2f} GB, int{args.bits}) in {time.perf_counter() - t0:.0f} s")
    size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    bandwidth = read_bandwidth_gbs()
    drop_file_cache(directory)
    cold = run_child(args, load_only=True)
    warm = run_child(args, load_only=False)
    gb = 1e9
    print(f"\n{args.model} int{args.bits} (unquantised parts and activations {args.dtype}), file {size / gb:.2f} GB, "
          f"{os.cpu_count()} cores; memory read bandwidth {bandwidth:.1f} GB/s")
    print(f"load: cold cache {cold['load_s']:.1f} s, warm {warm['load_s']:.1f} s; peak RSS (VmHWM) after load "
          f"{warm['hwm_load'] / gb:.2f} GB (growth over the load {(warm['hwm_load'] - warm['hwm_import']) / size:.2f}x "
          f"the file), at the end {warm['hwm_end'] / gb:.2f} GB")
    print(f"prefill ({args.prefill} tokens): {warm['prefill_tok_s']:.1f} tok/s")
    print(f"{'batch':>5s} {'decode tok/s':>13s} {'GB read/step':>13s} {'ceiling tok/s':>14s} {'of ceiling':>11s}")
    result: dict[str, object] = {"benchmark": "big_model", "model": args.model, "bits": args.bits,
                                 "dtype": args.dtype, "file_gb": size / gb, "bandwidth_gbs": bandwidth,
                                 "cold": cold, "warm": warm, "uptime": uptime()}
    for batch in (1, 8):
        per_step = warm[f"weights_per_token_b{batch}"]
        ceiling = bandwidth * gb / per_step * batch
        tok_s = warm[f"decode_b{batch}_tok_s"]
        print(f"{batch:5d} {tok_s:13.2f} {per_step / gb:13.3f} {ceiling:14.2f} {tok_s / ceiling:10.0%}")
        result[f"ceiling_b{batch}"] = ceiling
    print(uptime())
    print(json.dumps(result))
    if not args.keep_file:
        for f in directory.iterdir():
            f.unlink()
        directory.rmdir()


# ----------------------------------------------------------------------------------------------------------
# Mid-size, ours against transformers, interleaved


def compare(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import deepseek_moe as dm
    from deepseek_moe.kernels.quant_matmul import kernel_report, set_activations

    cfg = mid_size()
    directory = Path(args.dir)
    print(uptime())
    if not (directory / "config.json").is_file():
        write_random_checkpoint(cfg, directory, bits=None, dtype="bfloat16")
    wanted = args.models.split(",")
    models: dict[str, tuple[str, torch.nn.Module]] = {}
    for kind in ("fp32", "bf16"):
        if kind in wanted:
            models[f"ours {kind}"] = ("ours", dm.from_pretrained(directory, dtype={"fp32": "float32"}.get(kind, "bfloat16")))
    for kind in ("int8", "int4"):
        if kind in wanted:
            model = dm.from_pretrained(directory, dtype="float32", quantize=kind)
            # the same model once per activation format of the kernel (quant_matmul.set_activations), interleaved
            for act in args.activations.split(","):
                models[f"ours {kind} {act}-act"] = (f"ours:{act}", model)
    if not args.no_transformers:
        for dtype in (torch.float32, torch.bfloat16):
            hf = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
            models[f"transformers {str(dtype).removeprefix('torch.')}"] = ("hf", hf)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, 64), generator=g)

    def prefill(kind: str, model: torch.nn.Module) -> float:
        kind = _use_activations(kind)
        t0 = time.perf_counter()
        if kind == "ours":
            model(prompt)
        else:
            model(prompt, use_cache=True)
        return time.perf_counter() - t0

    def decode(kind: str, model: torch.nn.Module, n: int) -> float:
        kind = _use_activations(kind)
        if kind == "ours":
            cache = model.new_cache()
            tok = model(prompt[:, :16], cache=cache).logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(n):
                tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)
        else:
            out = model(prompt[:, :16], use_cache=True)
            pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(n):
                out = model(tok, past_key_values=pkv, use_cache=True)
                pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t0) / n

    best_p = dict.fromkeys(models, float("inf"))
    best_d = dict.fromkeys(models, float("inf"))
    with torch.inference_mode():
        for kind, model in models.values():
            decode(kind, model, 2)
        for _ in range(args.repeats):
            for name, (kind, model) in models.items():
                best_p[name] = min(best_p[name], prefill(kind, model))
                best_d[name] = min(best_d[name], decode(kind, model, args.tokens))
    print(f"\nmid-size ({dm.count_parameters(cfg)[0] / 1e6:.0f}M parameters), batch 1, "
          f"{torch.get_num_threads()} threads, best of {args.repeats} interleaved rounds")
    print(f"{'':20s} {'prefill (64 tokens)':>20s} {'decode':>12s} {'GB read/token':>14s}")
    rows = {}
    for name, (kind, model) in models.items():
        gbpt = weights_read_per_token(model) / 1e9 if kind.startswith("ours") else float("nan")
        print(f"{name:20s} {64 / best_p[name]:14.1f} tok/s {1 / best_d[name]:7.1f} tok/s {gbpt:14.3f}")
        rows[name] = {"prefill_tok_s": 64 / best_p[name], "decode_tok_s": 1 / best_d[name]}
    for name in rows:
        if name.endswith("int8-act") and (other := name.replace("int8-act", "fp32-act")) in rows:
            print(f"{name}: x{rows[name]['prefill_tok_s'] / rows[other]['prefill_tok_s']:.2f} prefill, "
                  f"x{rows[name]['decode_tok_s'] / rows[other]['decode_tok_s']:.2f} decode against fp32-act")
    set_activations(None)
    print(f"kernel: {kernel_report()}")
    print(uptime())
    print(json.dumps({"benchmark": "mid_size_decode", "threads": torch.get_num_threads(), "rows": rows,
                      "kernel_report": kernel_report(), "uptime": uptime()}))


def _use_activations(kind: str) -> str:
    """"ours:int8" -> set the kernel's activations to int8, return "ours"; other kinds unchanged."""
    from deepseek_moe.kernels.quant_matmul import set_activations

    if ":" in kind:
        kind, act = kind.split(":")
        set_activations(act)
    return kind


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="v2-lite")
    ap.add_argument("--bits", type=int, choices=(8, 4), default=8)
    ap.add_argument("--dir", default="/tmp/deepseek_moe_big_model", help="where the checkpoint is written")
    ap.add_argument("--dtype", default="bfloat16", help="of the unquantised parts and the activations")
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed")
    ap.add_argument("--prefill", type=int, default=512, help="prompt length for the prefill figure")
    ap.add_argument("--keep-file", action="store_true", help="do not delete the checkpoint afterwards")
    ap.add_argument("--compare", action="store_true", help="mid-size: ours vs transformers, fp32/bf16/int8/int4")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--models", default="fp32,bf16,int8,int4", help="--compare: which of ours to run")
    ap.add_argument("--activations", default="int8,fp32",
                    help="--compare: the quantised models once per activation format of the kernel, interleaved")
    ap.add_argument("--threads", type=int, default=0, help="torch (and kernel) threads; 0: torch's default")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
    elif args.compare:
        compare(args)
    else:
        headline(args)


if __name__ == "__main__":
    main()
