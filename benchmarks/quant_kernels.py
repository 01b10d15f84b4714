"""Weight-only matmul candidates at the model's shapes, with working sets far larger than L3.

Question: which way to multiply activations by int8 / int4 weights on this CPU is fastest for decode (1-8 rows)
and prefill (many rows), and how much each instruction-set path of our kernel (AVX-512, AVX2, scalar) gives,
with fp32 activations (codes widened to fp32) and with int8 activations (integer dot products), side by side?
Each candidate cycles through enough (N, K) matrices that its weights total >= --mb megabytes, so every call
streams from memory as in a real decode step. Reports GB/s of weight bytes (what bounds decode), us per matrix
and the speed-up over the PyTorch reference (dequantise the matrix, then matmul); candidates are timed
interleaved, round-robin. Prints the CPU model and its SIMD flags.

    python benchmarks/quant_kernels.py --mb 256 --rows 1 --isa all
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import uptime  # noqa: E402

from deepseek_moe.kernels.quant_matmul import (
    ACTIVATIONS,
    activations,
    kernel_isa,
    kernel_report,
    quant_matmul,
    quant_matmul_reference,
    quant_matmul_tiled,
    set_activations,
    set_kernel_isa,
    supported_isas,
)
from deepseek_moe.quant import pack

SIMD_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu() -> dict[str, object]:
    """The CPU model and which of the SIMD flags that matter here it has (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "simd_flags": [f for f in SIMD_FLAGS if f in flags]}


def build(N: int, K: int, n_mats: int, isas: list[str]) -> dict[str, tuple[list, int]]:
    """name -> (per-matrix operands, weight bytes per matrix). Our kernel appears once per path in ``isas``."""
    fp32 = [torch.randn(N, K) * 0.02 for _ in range(n_mats)]
    out: dict[str, tuple[list, int]] = {}
    out["fp32 F.linear"] = (fp32, N * K * 4)
    out["bf16 F.linear"] = ([w.bfloat16() for w in fp32], N * K * 2)
    i8 = [pack.quantize_int8(w) for w in fp32]
    out["int8 aten._weight_int8pack_mm"] = ([(q, s.float()) for q, s in i8], N * K)
    out["int8 reference (dequantise + matmul)"] = (i8, N * K)
    out["int8 dequant tiles + matmul"] = (i8, N * K)
    for isa in isas:
        for act in ACTIVATIONS:
            out[f"int8 ours {isa} {act}-act"] = (i8, N * K)
    i4 = []
    for w in fp32:
        p, s = pack.quantize_int4(w, 32)
        i4.append((pack.repack_int4_for_kernel(p, 32), s))
    i4_bytes = N * K // 2 + N * K // 32 * 2
    out["int4 reference (dequantise + matmul)"] = (i4, i4_bytes)
    out["int4 dequant tiles + matmul"] = (i4, i4_bytes)
    for isa in isas:
        for act in ACTIVATIONS:
            out[f"int4 ours {isa} {act}-act"] = (i4, i4_bytes)
    del fp32
    return out


def runner(name: str) -> Callable[[torch.Tensor, object], torch.Tensor]:
    if name.endswith("F.linear"):
        return lambda x, w: torch.nn.functional.linear(x.to(w.dtype), w)
    if "int8pack" in name:
        return lambda x, qs: torch.ops.aten._weight_int8pack_mm(x, qs[0], qs[1])
    if "tiles" in name:
        return lambda x, qs: quant_matmul_tiled(x, qs[0], qs[1])
    if "reference" in name:
        return lambda x, qs: quant_matmul_reference(x, qs[0], qs[1])
    return lambda x, qs: quant_matmul(x, qs[0], qs[1])


def isa_of(name: str) -> str | None:
    """The kernel path a candidate runs ("int8 ours avx2 int8-act" -> "avx2"), or None for the others."""
    return name.split(" ")[2] if " ours " in name else None


def act_of(name: str) -> str | None:
    """The activations a candidate's kernel multiplies with ("int8 ours avx2 int8-act" -> "int8")."""
    return name.rsplit(" ", 1)[1].removesuffix("-act") if " ours " in name else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256, help="weight megabytes per candidate (int8 size)")
    ap.add_argument("--shape", default="1408x2048", help="N x K (V2-Lite expert: 1408x2048)")
    ap.add_argument("--rows", default="1,8,64", help="rows of x")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch (and kernel) threads; 0: torch's default")
    ap.add_argument("--only", default="", help="comma list of substrings: time only candidates whose name has one "
                    "(e.g. 'ours,F.linear')")
    ap.add_argument("--isa", default="best",
                    help="kernel paths to time: best (the one chosen at run time), all (every one this CPU runs), "
                         "or a comma list of scalar,avx2,avx512")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    N, K = map(int, args.shape.split("x"))
    n_mats = max(1, args.mb * 2**20 // (N * K))
    chosen, chosen_act = kernel_isa(), activations()
    if chosen is None:
        isas = []
    elif args.isa == "best":
        isas = [chosen]
    elif args.isa == "all":
        isas = supported_isas()[::-1]
    else:
        isas = args.isa.split(",")
        for isa in isas:
            set_kernel_isa(isa)  # ValueError naming it if this CPU cannot run it
        set_kernel_isa(chosen)
    torch.manual_seed(0)
    cands = build(N, K, n_mats, isas)
    if args.only:
        cands = {k: v for k, v in cands.items() if any(part in k for part in args.only.split(","))}
    info = cpu()
    results = []
    print(uptime())
    print(f"CPU {info['model']} ({', '.join(map(str, info['simd_flags']))}); kernel path chosen at run time: "
          f"{chosen or 'none (no compiler)'}, activations {chosen_act if chosen else 'fp32'}")
    print(f"threads {torch.get_num_threads()}, {n_mats} matrices of {N}x{K} per candidate")
    print(f"{'candidate':38s} {'rows':>5s} {'GB/s':>8s} {'us/matrix':>10s} {'x reference':>12s} {'x fp32-act':>10s}")
    for M in map(int, args.rows.split(",")):
        x = torch.randn(M, K)
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, (ops, _) in cands.items():
                if (isa := isa_of(name)) is not None:
                    set_kernel_isa(isa)
                    set_activations(act_of(name))
                fn = runner(name)
                fn(x, ops[0])
                t0 = time.perf_counter()
                for w in ops:
                    fn(x, w)
                dt = (time.perf_counter() - t0) / len(ops)
                best[name] = min(best.get(name, float("inf")), dt)
        for name, dt in best.items():
            gbs = cands[name][1] / dt / 1e9
            ref = best.get(f"{name[:4]} reference (dequantise + matmul)")
            speedup = ref / dt if ref and name[:4] in ("int8", "int4") else None
            fp32_act = best.get(name.replace("int8-act", "fp32-act")) if act_of(name) == "int8" else None
            vs_fp32 = fp32_act / dt if fp32_act else None
            print(f"{name:38s} {M:5d} {gbs:8.2f} {dt * 1e6:10.1f} "
                  f"{'' if speedup is None else f'{speedup:11.1f}x':>12s}"
                  f"{'' if vs_fp32 is None else f'{vs_fp32:10.2f}x':>11s}")
            results.append({"candidate": name, "isa": isa_of(name), "activations": act_of(name), "rows": M,
                            "GB_per_s": round(gbs, 2), "us": round(dt * 1e6, 1),
                            "x_reference": None if speedup is None else round(speedup, 2),
                            "x_fp32_act": None if vs_fp32 is None else round(vs_fp32, 2)})
    if chosen is not None:
        set_kernel_isa(chosen)
    set_activations(None)
    print(uptime())
    print(json.dumps({"benchmark": "quant_kernels", "shape": [N, K], "threads": torch.get_num_threads(),
                      "cpu": info, "kernel_isa": chosen, "kernel_report": kernel_report(), "uptime": uptime(),
                      "results": results}))


if __name__ == "__main__":
    main()
