"""Weight-only matmul candidates at the model's shapes, with working sets far larger than L3.

Question: which way to multiply activations by int8 / int4 weights on this CPU is fastest for decode (1-8 rows)
and prefill (many rows)? Each candidate cycles through enough (N, K) matrices that its weights total
>= --mb megabytes, so every call streams from memory as in a real decode step. Reports GB/s of weight bytes
(what bounds decode) and us per matrix; candidates are timed interleaved, round-robin.

    python benchmarks/quant_kernels.py --mb 256
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from deepseek_moe.kernels.quant_matmul import kernel_available, quant_matmul, quant_matmul_tiled
from deepseek_moe.quant import pack


def build(N: int, K: int, n_mats: int) -> dict[str, tuple[list, int]]:
    """name -> (per-matrix operands, weight bytes per matrix)."""
    fp32 = [torch.randn(N, K) * 0.02 for _ in range(n_mats)]
    out: dict[str, tuple[list, int]] = {}
    out["fp32 F.linear"] = (fp32, N * K * 4)
    out["bf16 F.linear"] = ([w.bfloat16() for w in fp32], N * K * 2)
    i8 = [pack.quantize_int8(w) for w in fp32]
    out["int8 aten._weight_int8pack_mm"] = ([(q, s.float()) for q, s in i8], N * K)
    out["int8 dequant tiles + matmul"] = (i8, N * K)
    out["int8 ours (C++ kernel)"] = (i8, N * K)
    i4 = []
    for w in fp32:
        p, s = pack.quantize_int4(w, 32)
        i4.append((pack.repack_int4_for_kernel(p, 32), s))
    out["int4 dequant tiles + matmul"] = (i4, N * K // 2 + N * K // 32 * 2)
    out["int4 ours (C++ kernel)"] = (i4, N * K // 2 + N * K // 32 * 2)
    del fp32
    return out


def runner(name: str) -> Callable[[torch.Tensor, object], torch.Tensor]:
    if name.endswith("F.linear"):
        return lambda x, w: torch.nn.functional.linear(x.to(w.dtype), w)
    if "int8pack" in name:
        return lambda x, qs: torch.ops.aten._weight_int8pack_mm(x, qs[0], qs[1])
    if "tiles" in name:
        return lambda x, qs: quant_matmul_tiled(x, qs[0], qs[1])
    return lambda x, qs: quant_matmul(x, qs[0], qs[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256, help="weight megabytes per candidate (int8 size)")
    ap.add_argument("--shape", default="1408x2048", help="N x K (V2-Lite expert: 1408x2048)")
    ap.add_argument("--rows", default="1,8,64", help="rows of x")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    N, K = map(int, args.shape.split("x"))
    n_mats = max(1, args.mb * 2**20 // (N * K))
    torch.manual_seed(0)
    cands = build(N, K, n_mats)
    if not kernel_available():
        cands = {k: v for k, v in cands.items() if "ours" not in k}
    results = []
    print(f"threads {torch.get_num_threads()}, {n_mats} matrices of {N}x{K} per candidate")
    print(f"{'candidate':34s} {'rows':>5s} {'GB/s':>8s} {'us/matrix':>10s}")
    for M in map(int, args.rows.split(",")):
        x = torch.randn(M, K)
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, (ops, _) in cands.items():
                fn = runner(name)
                fn(x, ops[0])
                t0 = time.perf_counter()
                for w in ops:
                    fn(x, w)
                dt = (time.perf_counter() - t0) / len(ops)
                best[name] = min(best.get(name, float("inf")), dt)
        for name, dt in best.items():
            gbs = cands[name][1] / dt / 1e9
            print(f"{name:34s} {M:5d} {gbs:8.2f} {dt * 1e6:10.1f}")
            results.append({"candidate": name, "rows": M, "GB_per_s": round(gbs, 2), "us": round(dt * 1e6, 1)})
    print(json.dumps({"benchmark": "quant_kernels", "shape": [N, K], "threads": torch.get_num_threads(),
                      "results": results}))


if __name__ == "__main__":
    main()
