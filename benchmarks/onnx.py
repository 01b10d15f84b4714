"""PyTorch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8, side by side in one run (the design's table).

For the credit-risk model (examples/risk_model.py, sequence length 64), the recommender (examples/recommender.py)
and the tiny language model: latency per request at batch 1 (p50/p99) and per batch of 32 (p50), model file
size (external data included; PyTorch: its safetensors file) and peak process memory. For the language model,
prefill of 256 tokens and decode tokens/s. Latencies are interleaved (one request of each runtime in turn), so
load from other processes hits all three alike; peak memory is VmHWM of a fresh process per runtime that loads
only what that runtime needs (ORT processes never import torch) and serves the same requests.

    python benchmarks/onnx.py [--requests 200] [--threads 2] [--out runs/bench_onnx]

Prints the table, the floors (int8 <= 1/3 of fp32 size; risk model int8 p50 <= PyTorch fp32 p50, p99 < 100 ms)
and one JSON line. Weights are random (latency, size and memory do not depend on training).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named onnx.py and Python puts its directory first on sys.path, where it would shadow the onnx
# package for everything imported after it.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

import numpy as np  # noqa: E402

if TYPE_CHECKING:
    import torch

ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "examples"))

RUNTIMES = ("pytorch_fp32", "ort_fp32", "ort_int8")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


# --- the three models, each: build() -> module, inputs(batch) -> dict of numpy arrays, call(module, inputs) ---

def build_risk() -> torch.nn.Module:
    import torch
    from risk_model import RiskModel, risk_moe_config

    torch.manual_seed(0)
    return RiskModel(risk_moe_config()).eval()


def risk_inputs(batch: int, seq_len: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {"features": rng.standard_normal((batch, seq_len, 256), dtype=np.float32)}


def build_recommender() -> torch.nn.Module:
    import torch
    from recommender import CTRModel

    from deepseek_moe import MoEConfig

    torch.manual_seed(0)
    cfg = MoEConfig(dim=64, moe_inter_dim=32, n_routed_experts=16, n_activated_experts=3, n_shared_experts=1)
    return CTRModel(2000, 500, 64, cfg).eval()


def recommender_inputs(batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {"user": rng.integers(0, 2000, batch), "item": rng.integers(0, 500, batch),
            "hour": rng.integers(0, 24, batch), "device": rng.integers(0, 3, batch)}


def build_lm() -> torch.nn.Module:
    import torch

    from deepseek_moe import DeepSeekMoEForCausalLM, get_preset

    torch.manual_seed(0)
    return DeepSeekMoEForCausalLM(get_preset("tiny")).eval()


MODELS: dict[str, dict[str, Any]] = {
    "risk (seq 64)": {"build": build_risk, "inputs": risk_inputs, "dict_input": False},
    "recommender": {"build": build_recommender, "inputs": recommender_inputs, "dict_input": True},
}


def torch_call(model: torch.nn.Module, inputs: dict[str, np.ndarray], dict_input: bool) -> Any:
    import torch

    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.inference_mode():
        return model(tensors) if dict_input else model(*tensors.values())


def torch_file_bytes(model: torch.nn.Module, path: Path) -> int:
    import torch  # noqa: F401  (safetensors.torch needs it loaded)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    seen: dict[int, str] = {}
    unique = {}
    for k, v in state.items():  # tied weights once
        if v.data_ptr() not in seen:
            seen[v.data_ptr()] = k
            unique[k] = v
    save_file(unique, str(path))
    return path.stat().st_size


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # ORT's workers spin after each call by default; interleaved with PyTorch they would take the cores from the
    # PyTorch call that follows and inflate its latency. Off, each runtime gets the machine to itself in its turn.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved(calls: dict[str, Callable[[], Any]], n: int, warmup: int = 5) -> dict[str, np.ndarray]:
    """Milliseconds per call, the runtimes taking turns call by call."""
    for _ in range(warmup):
        for f in calls.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(n):
        for k, f in calls.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: np.array(v) for k, v in times.items()}


def peak_memory_mb(runtime: str, model: str, path: str, threads: int, requests: int) -> float:
    """VmHWM of a fresh process serving ``requests`` batch-1 requests with one runtime."""
    out = subprocess.run([sys.executable, __file__, "--probe", runtime, model, path, "--threads", str(threads),
                          "--requests", str(requests)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def probe(runtime: str, model: str, path: str, threads: int, requests: int) -> None:
    """The --probe child: load one runtime, serve batch-1 requests, print peak RSS in MB. ORT children never
    import torch (nor deepseek_moe, whose package imports it): what a deployment of the graph would hold."""
    if model == "tiny LM":
        ids = np.random.default_rng(0).integers(0, 4096, (1, 256))
        if runtime == "pytorch_fp32":
            import torch

            torch.set_num_threads(threads)
            lm = build_lm()
            with torch.inference_mode():
                for _ in range(max(requests // 20, 2)):
                    cache = lm.new_cache()
                    lm(torch.from_numpy(ids), cache=cache)
        else:
            prefill = session(Path(path) / ("prefill.int8.onnx" if runtime == "ort_int8" else "prefill.onnx"),
                              threads)
            for _ in range(max(requests // 20, 2)):
                prefill.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        print(vm_hwm_mb())
        return
    spec = MODELS[model]
    inputs = spec["inputs"](1)
    if runtime == "pytorch_fp32":
        import torch

        torch.set_num_threads(threads)
        m = spec["build"]()
        for _ in range(requests):
            torch_call(m, inputs, spec["dict_input"])
    else:
        s = session(Path(path), threads)
        for _ in range(requests):
            s.run(None, inputs)
    print(vm_hwm_mb())


def bench_module(name: str, spec: dict[str, Any], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from deepseek_moe.export import model_bytes, quantize_int8, to_onnx

    model = spec["build"]()
    example = {k: torch.from_numpy(v) for k, v in spec["inputs"](2).items()}
    stem = out / name.split()[0]
    fp32 = to_onnx(model, stem.with_suffix(".onnx"), (example,) if spec["dict_input"] else (*example.values(),))
    int8 = quantize_int8(fp32, stem.with_suffix(".int8.onnx"))
    paths = {"pytorch_fp32": str(stem), "ort_fp32": str(fp32), "ort_int8": str(int8)}
    sessions = {"ort_fp32": session(fp32, args.threads), "ort_int8": session(int8, args.threads)}
    row: dict[str, Any] = {"size_bytes": {"pytorch_fp32": torch_file_bytes(model, stem.with_suffix(".safetensors")),
                                          "ort_fp32": model_bytes(fp32), "ort_int8": model_bytes(int8)}}
    for batch, n, key in ((1, args.requests, "b1"), (32, max(args.requests // 5, 10), "b32")):
        inputs = spec["inputs"](batch)
        calls = {"pytorch_fp32": lambda inputs=inputs: torch_call(model, inputs, spec["dict_input"]),
                 **{k: (lambda s=s, inputs=inputs: s.run(None, inputs)) for k, s in sessions.items()}}
        lat = interleaved(calls, n)
        row[f"{key}_p50_ms"] = {k: float(np.percentile(v, 50)) for k, v in lat.items()}
        row[f"{key}_p99_ms"] = {k: float(np.percentile(v, 99)) for k, v in lat.items()}
    row["peak_mb"] = {r: peak_memory_mb(r, name, paths[r], args.threads, args.requests) for r in RUNTIMES}
    return row


def bench_lm(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from deepseek_moe.export import export_language_model, model_bytes
    from deepseek_moe.export.runtime import OnnxLM

    model = build_lm()
    lm_dir = out / "tiny_lm"
    export_language_model(model, lm_dir, int8=True)
    onnx = {"ort_fp32": OnnxLM(lm_dir, threads=args.threads), "ort_int8": OnnxLM(lm_dir, int8=True, threads=args.threads)}
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 256))
    mask = np.ones_like(prompt)
    steps = 32

    def torch_prefill() -> None:
        with torch.inference_mode():
            model(torch.from_numpy(prompt), cache=model.new_cache())

    def torch_decode() -> None:
        with torch.inference_mode():
            cache = model.new_cache()
            logits = model(torch.from_numpy(prompt), cache=cache).logits[:, -1]
            t = time.perf_counter()
            for _ in range(steps):
                logits = model(logits.argmax(-1, keepdim=True), cache=cache).logits[:, -1]
            decode_times["pytorch_fp32"].append(time.perf_counter() - t)

    def ort_decode(lm: OnnxLM, key: str) -> None:
        logits, past = lm.step(prompt, mask, None)
        full = mask
        t = time.perf_counter()
        for _ in range(steps):
            full = np.concatenate((full, np.ones((1, 1), dtype=np.int64)), axis=1)
            logits, past = lm.step(logits[:, -1].argmax(-1)[:, None], full, past)
        decode_times[key].append(time.perf_counter() - t)

    n = max(args.requests // 10, 10)
    prefill = interleaved({"pytorch_fp32": torch_prefill,
                           **{k: (lambda lm=lm: lm.step(prompt, mask, None)) for k, lm in onnx.items()}}, n, warmup=2)
    decode_times: dict[str, list[float]] = {k: [] for k in RUNTIMES}
    interleaved({"pytorch_fp32": torch_decode, **{k: (lambda lm=lm, k=k: ort_decode(lm, k)) for k, lm in onnx.items()}},
                max(n // 2, 5), warmup=1)
    size = {"pytorch_fp32": torch_file_bytes(model, out / "tiny_lm.safetensors"),
            "ort_fp32": model_bytes(lm_dir / "prefill.onnx") + model_bytes(lm_dir / "decode.onnx"),
            "ort_int8": model_bytes(lm_dir / "prefill.int8.onnx") + model_bytes(lm_dir / "decode.int8.onnx")}
    return {"size_bytes": size,
            "prefill256_p50_ms": {k: float(np.percentile(v, 50)) for k, v in prefill.items()},
            "prefill256_p99_ms": {k: float(np.percentile(v, 99)) for k, v in prefill.items()},
            "decode_tok_s": {k: steps / float(np.median(v)) for k, v in decode_times.items()},
            "peak_mb": {r: peak_memory_mb(r, "tiny LM", str(lm_dir), args.threads, args.requests) for r in RUNTIMES}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="timed batch-1 requests per runtime")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for PyTorch and ORT alike")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_onnx"))
    parser.add_argument("--probe", nargs=3, metavar=("RUNTIME", "MODEL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(*args.probe, args.threads, args.requests)
        return
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = uptime()
    results = {name: bench_module(name, spec, args.out, args) for name, spec in MODELS.items()}
    results["tiny LM"] = bench_lm(args.out, args)

    mb = 1e6
    print(f"\nthreads {args.threads}; {args.requests} interleaved batch-1 requests; {load_before}")
    header = f"{'model':<15}{'runtime':<14}{'b1 p50 ms':>10}{'b1 p99 ms':>10}{'b32 p50 ms':>11}{'size MB':>9}{'peak MB':>9}"
    print(header)
    for name, row in results.items():
        for r in RUNTIMES:
            if name == "tiny LM":
                print(f"{name:<15}{r:<14}{row['prefill256_p50_ms'][r]:>10.2f}{row['prefill256_p99_ms'][r]:>10.2f}"
                      f"{'-':>11}{row['size_bytes'][r] / mb:>9.2f}{row['peak_mb'][r]:>9.0f}"
                      f"   prefill 256 tokens; decode {row['decode_tok_s'][r]:.0f} tok/s")
            else:
                print(f"{name:<15}{r:<14}{row['b1_p50_ms'][r]:>10.2f}{row['b1_p99_ms'][r]:>10.2f}"
                      f"{row['b32_p50_ms'][r]:>11.2f}{row['size_bytes'][r] / mb:>9.2f}{row['peak_mb'][r]:>9.0f}")
    floors = {f"{name}: int8 size <= 1/3 fp32": row["size_bytes"]["ort_int8"] <= row["size_bytes"]["ort_fp32"] / 3
              for name, row in results.items()}
    risk = results["risk (seq 64)"]
    floors["risk: ORT int8 p50 <= PyTorch fp32 p50"] = risk["b1_p50_ms"]["ort_int8"] <= risk["b1_p50_ms"]["pytorch_fp32"]
    floors["risk: ORT int8 p99 < 100 ms"] = risk["b1_p99_ms"]["ort_int8"] < 100
    for k, ok in floors.items():
        print(f"{'PASS' if ok else 'FAIL'}  {k}")
    print(json.dumps({"uptime_before": load_before, "uptime_after": uptime(), "threads": args.threads,
                      "results": results, "floors": floors}))


if __name__ == "__main__":
    main()
