"""y = x @ W^T for fp32 and bf16 weights on the CPU, fp32 accumulation: the readable reference and the fast path.

Why a kernel for something torch has: on a CPU without AVX512-BF16 (AVX2-only laptops, AMD EPYCs of the Zen 2/3
kind) torch's bf16 matmul runs a generic loop that is 2-5x slower than its fp32 one, so a bf16 model decoded
slower than the same model in fp32 (issue 22). ``float_gemm.cpp`` reads the bf16 weight as stored, half the
bytes of fp32 on a memory-bound decode step, and widens it in registers. The same tiles take fp32 weights, which
lets :func:`float_experts` run a whole MoE layer's selected experts in one call.

* :func:`float_matmul_reference` / :func:`float_experts_reference`: fp32 matmuls on upcast operands, obviously
  right;
* :func:`float_matmul` / :func:`float_experts`: the C++ kernel where it applies (CPU, no autograd, a compiler),
  else None from the ``*_kernel`` functions and the reference from the others.

Which layers use them is decided where they are called (``nn/linear.py``, ``moe/experts.py``), from the
measurements in docs/performance.md.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch
import torch.nn.functional as F

from deepseek_moe._torch_compat import mkldnn_bf16_supported
from deepseek_moe.kernels import cpu_build
from deepseek_moe.kernels.switch import fast_paths_enabled

WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def torch_bf16_matmul_is_native() -> bool:
    """Whether torch multiplies bf16 through oneDNN on this CPU (AVX-512 / AVX512-BF16 / AMX): there the many
    rows of a prefill may be faster in torch than in our AVX2 tiles, which were measured only where it is not."""
    return mkldnn_bf16_supported()


def float_matmul_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T -> (..., N), computed in fp32 and returned in x's dtype."""
    return (x.float() @ w.float().t()).to(x.dtype)


def _library_for(x: torch.Tensor, *ws: torch.Tensor) -> Any:
    """The compiled library when it can serve x and the weights (CPU, no autograd, fp32/bf16, not inside
    ``reference_paths()``), else None."""
    if not fast_paths_enabled() or x.device.type != "cpu" or not x.is_floating_point() or (torch.is_grad_enabled() and (
            x.requires_grad or any(w.requires_grad for w in ws))):
        return None
    if any(w.dtype not in WEIGHT_DTYPES or w.device.type != "cpu" for w in ws):
        return None
    return cpu_build.load_float_gemm_library()


def float_matmul_kernel(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x (..., K) @ w (N, K)^T in x's dtype through ``float_gemm.cpp``, or None where the kernel does not apply.
    ValueError when the shapes do not fit (the kernel reads raw memory: a wrong shape would not fail by itself)."""
    if w.dim() != 2 or x.dim() == 0 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"float_matmul: x {tuple(x.shape)} and w {tuple(w.shape)}: w must be (N, K) with K equal "
                         "to x's last dimension")
    lib = _library_for(x, w)
    if lib is None or w.stride(1) != 1:
        return None
    K, N = w.shape[1], w.shape[0]
    M = x.shape[:-1].numel()
    x32 = x.reshape(M, K).to(torch.float32).contiguous()
    y = torch.empty(M, N, dtype=torch.float32)
    if M and N:
        lib.dsm_fgemm(x32.data_ptr(), K, M, K, w.data_ptr(), w.stride(0), int(w.dtype == torch.bfloat16), N,
                      y.data_ptr(), N, torch.get_num_threads())
    return y.view(*x.shape[:-1], N).to(x.dtype)


def float_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T in x's dtype: the kernel where it applies, else the reference."""
    y = float_matmul_kernel(x, w)
    return float_matmul_reference(x, w) if y is None else y


def float_experts_reference(x_AD: torch.Tensor, counts_E: torch.Tensor, gates_A: torch.Tensor | None,
                            w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """Per expert e, SwiGLU on its ``counts_E[e]`` contiguous rows of x_AD in fp32: w2[e](silu(w1[e] x) * w3[e] x
    * gate). w1, w3 (E, F, D), w2 (E, D, F). Returns (A, D) in x's dtype."""
    y = torch.zeros(x_AD.shape[0], w2.shape[1], dtype=torch.float32, device=x_AD.device)
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            x = x_AD[start:start + n].float()
            h = F.silu(x @ w1[e].float().t()) * (x @ w3[e].float().t())
            if gates_A is not None:
                h = h * gates_A[start:start + n, None].float()
            y[start:start + n] = h @ w2[e].float().t()
        start += n
    return y.to(x_AD.dtype)


def float_experts_kernel(x_AD: torch.Tensor, counts_E: torch.Tensor, gates_A: torch.Tensor | None,
                         w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor | None:
    """:func:`float_experts_reference` in one call to ``float_gemm.cpp`` (only the experts with rows run), or
    None where the kernel does not apply (autograd, another device or dtype, weights of different dtypes)."""
    _check_experts(x_AD, counts_E, gates_A, w1, w2, w3)
    lib = _experts_library(x_AD, gates_A, w1, w2, w3)
    if lib is None:
        return None
    counts = counts_E.tolist()
    starts = list(itertools.accumulate(counts, initial=0))
    active = [e for e, n in enumerate(counts) if n]
    first = [starts[e] for e in active]
    return _run_experts(lib, x_AD, active, first, first, [counts[e] for e in active], gates_A, w1, w2, w3)


def float_experts_one_token_reference(x_1D: torch.Tensor, experts_K: torch.Tensor, gates_K: torch.Tensor,
                                      w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One token through each of its K selected experts: row k of the (K, D) result is expert experts_K[k]'s
    gated output (:func:`float_experts_reference` on the token's row repeated K times, rows sorted by expert)."""
    order = torch.argsort(experts_K, stable=True)
    counts = torch.bincount(experts_K, minlength=w1.shape[0])
    y = float_experts_reference(x_1D.expand(experts_K.shape[0], -1), counts, gates_K[order], w1, w2, w3)
    return torch.empty_like(y).index_copy_(0, order, y)


def float_experts_one_token(x_1D: torch.Tensor, experts_K: torch.Tensor, gates_K: torch.Tensor,
                            w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor | None:
    """:func:`float_experts_one_token_reference` in one kernel call that reads the token's row in place (no
    sort, no gather: a decode step's K experts are distinct), or None where the kernel does not apply."""
    K = experts_K.shape[0] if experts_K.dim() == 1 else -1
    if x_1D.shape[0] != 1 or K < 0 or gates_K.shape != (K,):
        raise ValueError(f"float_experts_one_token: x {tuple(x_1D.shape)} must be (1, D), experts "
                         f"{tuple(experts_K.shape)} and gates {tuple(gates_K.shape)} (K,)")
    _check_experts(x_1D.expand(K, -1), torch.bincount(experts_K, minlength=w1.shape[0]), gates_K, w1, w2, w3)
    lib = _experts_library(x_1D, gates_K, w1, w2, w3)
    if lib is None:
        return None
    return _run_experts(lib, x_1D, experts_K.tolist(), [0] * K, list(range(K)), [1] * K, gates_K, w1, w2, w3)


def _experts_library(x: torch.Tensor, gates: torch.Tensor | None, w1: torch.Tensor, w2: torch.Tensor,
                     w3: torch.Tensor) -> Any:
    if gates is not None and gates.requires_grad and torch.is_grad_enabled():
        return None  # the router trains through the gates even where x and the experts are frozen
    lib = _library_for(x, w1, w2, w3)
    if lib is None or not (w1.dtype == w2.dtype == w3.dtype) or not all(w.is_contiguous() for w in (w1, w2, w3)):
        return None
    return lib


def _run_experts(lib: Any, x: torch.Tensor, expert: list[int], x_start: list[int], start: list[int],
                 length: list[int], gates_A: torch.Tensor | None, w1: torch.Tensor, w2: torch.Tensor,
                 w3: torch.Tensor) -> torch.Tensor:
    """dsm_fexperts on items (expert, x rows from x_start, output rows from start, length rows)."""
    A, D, F_ = sum(length), x.shape[1], w1.shape[1]
    meta = torch.tensor([expert, x_start, start, length], dtype=torch.int64).reshape(4, len(expert))
    x32 = x.to(torch.float32).contiguous()
    h1, h3 = torch.empty(A, F_), torch.empty(A, F_)
    y = torch.empty(A, D)
    g = None if gates_A is None else gates_A.to(torch.float32).contiguous()
    if expert:
        lib.dsm_fexperts(x32.data_ptr(), A, D, F_, len(expert), meta[0].data_ptr(), meta[1].data_ptr(),
                         meta[2].data_ptr(), meta[3].data_ptr(), w1.data_ptr(), w3.data_ptr(), w2.data_ptr(),
                         int(w1.dtype == torch.bfloat16), None if g is None else g.data_ptr(), h1.data_ptr(),
                         h3.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y.to(x.dtype)


def _check_experts(x_AD: torch.Tensor, counts_E: torch.Tensor, gates_A: torch.Tensor | None,
                   w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> None:
    """ValueError naming the argument unless the stacked weights, counts and gates fit x (shapes only: this runs
    once per MoE layer per decoded token)."""
    if x_AD.dim() != 2:
        raise ValueError(f"float_experts: x must be (A, D), got shape {tuple(x_AD.shape)}")
    A, D = x_AD.shape
    if w1.dim() != 3:
        raise ValueError(f"float_experts: w1 must be (E, F, D), got shape {tuple(w1.shape)}")
    E, F_ = w1.shape[0], w1.shape[1]
    for name, w, want in (("w1", w1, (E, F_, D)), ("w3", w3, (E, F_, D)), ("w2", w2, (E, D, F_))):
        if tuple(w.shape) != want:
            raise ValueError(f"float_experts: {name} has shape {tuple(w.shape)}, expected {want} for x {(A, D)} "
                             "(w1, w3: (E, F, D), w2: (E, D, F))")
    if counts_E.shape != (E,):
        raise ValueError(f"float_experts: counts has shape {tuple(counts_E.shape)}, expected ({E},)")
    if int(counts_E.sum()) != A:
        raise ValueError(f"float_experts: counts sum to {int(counts_E.sum())}, x has {A} rows")
    if gates_A is not None and gates_A.shape != (A,):
        raise ValueError(f"float_experts: gates has shape {tuple(gates_A.shape)}, expected ({A},)")


def kernel_isa() -> str | None:
    """The instruction set ``float_gemm.cpp`` runs ("avx2" or "scalar"), or None when there is no kernel."""
    lib = cpu_build.load_float_gemm_library()
    return None if lib is None else cpu_build.FLOAT_GEMM_ISAS[lib.dsm_fgemm_get_isa()]


def set_kernel_isa(isa: str) -> None:
    """Make the kernel use ``isa`` from now on (tests, benchmarks); ValueError if unknown or this CPU cannot."""
    lib = cpu_build.load_float_gemm_library()
    if lib is None:
        raise ValueError("no compiled float_gemm kernel (no C++ compiler, or DEEPSEEK_MOE_KERNELS=0)")
    if isa not in cpu_build.FLOAT_GEMM_ISAS:
        raise ValueError(f"unknown float_gemm instruction set {isa!r}: expected one of "
                         f"{', '.join(cpu_build.FLOAT_GEMM_ISAS)}")
    if lib.dsm_fgemm_set_isa(cpu_build.FLOAT_GEMM_ISAS.index(isa)) != 0:
        raise ValueError(f"this CPU cannot run the {isa} float_gemm kernels")


__all__ = ["torch_bf16_matmul_is_native", "float_experts_kernel", "float_experts_one_token", "float_experts_one_token_reference",
           "float_experts_reference", "float_matmul", "float_matmul_kernel",
           "float_matmul_reference", "kernel_isa", "set_kernel_isa"]
