"""y = x @ dequant(W)^T for weight-only int8 / int4 weights: the readable reference and the fast CPU path.

Weights (layouts in ``kernels/quant_layout.py``): int8 codes (N, K) with float32 per-row scales (N,), or int4
codes packed in the *kernel* layout, uint8 (N, K/2), with float16 group scales (N, K/group_size).

* :func:`quant_matmul_reference` dequantises the whole matrix and calls matmul: obviously right, slow.
* :func:`quant_matmul` picks, by the number of rows of x:
  - on the CPU without autograd: the C++ kernel of ``qgemm.cpp``, which streams the codes once per 64 rows of x
    and never writes a dequantised matrix (decode is memory-bound: move as few bytes as possible); from
    :func:`strip_rows` rows of x on (fp32 activations: training, prefill) it widens 16 rows of W at
    a time into an fp32 panel that stays in cache and runs a register tile over every row of x. It has an
    AVX-512, an AVX2+FMA+F16C and a scalar path, picked from CPUID; :func:`kernel_isa` says which runs,
    :func:`set_kernel_isa` (or ``DEEPSEEK_MOE_KERNEL_ISA``) forces one;
  - otherwise (autograd, other devices, no compiler, or ``DEEPSEEK_MOE_KERNELS=0``): dequantise tiles of W to
    x's dtype and use the ordinary matmul; tiles keep a 102400-row head from being materialised whole.

The kernel multiplies the weights either with the activations as they are (``"fp32"``: codes widened to fp32,
compute-bound) or with the activations quantised to int8 per row and block of 32 (``"int8"``, as llama.cpp's
Q8_0 x Q8_0: exact integer dot products per block, then one fp32 multiply-add per block). The int8 path's
readable twin is :func:`quant_matmul_q8_reference` (:func:`quantize_activations` gives the very codes the kernel
uses). :func:`set_activations` / ``DEEPSEEK_MOE_QUANT_ACTIVATIONS`` choose; ``DEFAULT_ACTIVATIONS`` is the
default (why: docs/quantisation.md). Without the kernel, activations stay fp32.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, TypedDict

import torch
import torch.nn.functional as F

from deepseek_moe import env
from deepseek_moe.kernels import cpu_build
from deepseek_moe.kernels.cpu_build import load_library
from deepseek_moe.kernels.quant_layout import (
    INT4_SCALE_DTYPE,
    INT8_SCALE_DTYPE,
    dequantize,
    unpack_int4_kernel_layout,
)
from deepseek_moe.kernels.switch import fast_paths_enabled

# Up to this many rows of x the kernel runs; beyond, dequantised tiles + GEMM. Measured at 1408x2048 on this
# CPU (benchmarks/quant_kernels.py --rows): the kernel still matched the fp32 GEMM at 128 rows and beat
# dequantise-then-GEMM at every size up to there (torch's dequantisation costs more than the GEMM saves).
KERNEL_MAX_ROWS = 1 << 20
# Rows of W dequantised at a time on the tiled path: 4096 x 2048 fp32 is 32 MB.
TILE_ROWS = 4096
ACTIVATIONS = ("int8", "fp32")
# fp32 by default although int8 costs next to nothing in quality and wins for int4 weights (docs/quantisation.md,
# "int8 activations: measured"): a row's codes move by one when its input moves by ~1e-7, so outputs then depend
# on batching (speculative verification, prefill vs cached decode) at the 0.5% level, and int8-weight decode was
# not shown faster on this loaded AVX2 machine.
DEFAULT_ACTIVATIONS = "fp32"
ACT_BLOCK = 32  # activation columns per int8 scale
_activations: str | None = None  # set_activations()


def activations() -> str:
    """What the kernel multiplies the weights with: "int8" (quantised activations) or "fp32"."""
    if _activations is not None:
        return _activations
    forced = env.quant_activations()
    if forced is not None and forced not in ACTIVATIONS:
        raise ValueError(f"{env.QUANT_ACTIVATIONS}={forced}: expected one of {', '.join(ACTIVATIONS)}")
    return forced or DEFAULT_ACTIVATIONS


def set_activations(mode: str | None) -> None:
    """Use "int8" or "fp32" activations in the kernel from now on (None: back to the environment / default)."""
    global _activations
    if mode is not None and mode not in ACTIVATIONS:
        raise ValueError(f"activations ({mode!r}) must be one of {', '.join(ACTIVATIONS)}")
    _activations = mode


def quantize_activations(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> int8 codes (M, nb * 32), each row zero-padded, and float32 scales (M, nb), nb = ceil(K / 32).

    Per block: d = max|x| / 127, code = round-half-to-even(x * (1 / d)) in [-127, 127] (0 where d is 0); a
    block holding a NaN gets d = NaN and codes 0. The kernel does the same IEEE float32 operations, so its codes
    equal these exactly."""
    M, K = x_MK.shape
    nb = -(-K // ACT_BLOCK)
    x = F.pad(x_MK.float(), (0, nb * ACT_BLOCK - K)).view(M, nb, ACT_BLOCK)
    d = x.abs().amax(-1) / 127  # NaN for a block holding a NaN (amax propagates it): the product's NaN
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(x * inv[..., None]).clamp(-127, 127).nan_to_num(0.0).to(torch.int8)  # a NaN block's codes: 0
    return q.view(M, nb * ACT_BLOCK), d


def quant_matmul_q8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8-activation algorithm in plain PyTorch: x (..., K) -> (..., N) in x's dtype.

    Per block b of 32 columns: isum_b = the integer dot product of x's codes with the weight codes (computed in
    float64, exact), y = sum_b d_b * isum_b * row scale (int8), or sum_b (d_b * group scale) * isum_b (int4:
    the factor rounded to float32 as the kernel does). The kernel sums the blocks in float32, in another order."""
    K = x.shape[-1]
    xq, xd = quantize_activations(x.reshape(-1, K))
    M, nb = xd.shape
    N = q.shape[0]
    codes = q if q.dtype == torch.int8 else unpack_int4_kernel_layout(q, _group_size(q, scale))
    wq = F.pad(codes, (0, nb * ACT_BLOCK - K)).view(N, nb, ACT_BLOCK)
    isum = torch.einsum("mbk,nbk->mnb", xq.view(M, nb, ACT_BLOCK).double(), wq.double())
    if q.dtype == torch.int8:
        y = (xd[:, None, :].double() * isum).sum(-1) * scale.double()
    else:
        factor = xd[:, None, :] * scale.float().repeat_interleave(_group_size(q, scale) // ACT_BLOCK, dim=1)
        y = (factor.double() * isum).sum(-1)
    return y.float().view(*x.shape[:-1], N).to(x.dtype)


def quant_matmul_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> (..., N), computed in float32 and returned in x's dtype."""
    return (x.float() @ dequantize(q, scale).t()).to(x.dtype)


def _check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, what: str = "quant_matmul") -> None:
    """ValueError naming the argument unless (q, scale) is a weight in one of the two layouts that x can multiply.
    The kernel reads raw memory, so a wrong dtype or stride would be a silently wrong answer, not an error."""
    if q.dtype not in (torch.int8, torch.uint8) or q.dim() != 2:
        raise ValueError(f"{what}: q must be int8 codes (N, K) or uint8 int4 codes (N, K/2), got {q.dtype} "
                         f"{tuple(q.shape)}")
    N, H = q.shape
    if q.dtype == torch.int8:
        kind, want_dtype, K_codes, ok_shape = "int8", INT8_SCALE_DTYPE, H, scale.shape == (N,)
        want_shape = f"({N},), one per row of q"
    else:
        G = scale.shape[-1] if scale.dim() else 0
        kind, want_dtype, K_codes = "int4", INT4_SCALE_DTYPE, 2 * H
        ok_shape = scale.dim() == 2 and scale.shape[0] == N and G > 0 and K_codes % G == 0 and (K_codes // G) % 2 == 0
        want_shape = f"({N}, G), G groups of an even number of columns dividing {K_codes}"
    if scale.dtype != want_dtype:
        raise ValueError(f"{what}: scale is {scale.dtype}; {kind} codes need {want_dtype} scales "
                         f"(an {scale.dtype} scale would be misread)")
    if not ok_shape:
        raise ValueError(f"{what}: scale has shape {tuple(scale.shape)}; {kind} codes {tuple(q.shape)} need {want_shape}")
    for name, t in (("q", q), ("scale", scale)):
        if not t.is_contiguous():
            raise ValueError(f"{what}: {name} is not contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
                             f"pass {name}.contiguous()")
        if t.device != x.device:
            raise ValueError(f"{what}: {name} is on {t.device}, x on {x.device}")
    if not x.is_floating_point():
        raise ValueError(f"{what}: x must be a floating-point tensor, got {x.dtype}")
    K = x.shape[-1] if x.dim() else 0
    if K != K_codes:
        raise ValueError(f"{what}: input width {K} does not match the weight's {K_codes} columns "
                         f"(codes {tuple(q.shape)} {q.dtype})")


def quant_matmul_tiled(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dequantise TILE_ROWS rows of W at a time in x's dtype and matmul (prefill, and the no-compiler path)."""
    N = q.shape[0]
    tiles = [x @ dequantize(q[n0:n0 + TILE_ROWS], scale[n0:n0 + TILE_ROWS], x.dtype).t()
             for n0 in range(0, N, TILE_ROWS)]
    return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=-1)


def quant_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ dequant(q)^T -> (..., N) in x's dtype."""
    _check(x, q, scale)
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    lib = _kernel_for(x)
    if lib is None or M > KERNEL_MAX_ROWS or M == 0 or (q.dtype == torch.uint8 and _group_size(q, scale) % 32):
        return quant_matmul_tiled(x, q, scale)
    N = q.shape[0]
    # Calls are few microseconds of work at decode, so skip even the no-op conversions of a contiguous fp32 x.
    x32 = x if x.dtype is torch.float32 and x.is_contiguous() else x.reshape(M, K).float().contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    if activations() == "int8" and (q.dtype == torch.int8 or _q8_steps_groups(_group_size(q, scale))):
        bits, gs = (8, 0) if q.dtype == torch.int8 else (4, _group_size(q, scale))
        lib.dsm_qgemm_q8(x32.data_ptr(), K, M, K, bits, q.data_ptr(), scale.data_ptr(), gs, N, y.data_ptr(), N,
                         torch.get_num_threads())
    elif q.dtype == torch.int8:
        lib.dsm_qgemm_int8(x32.data_ptr(), K, M, K, q.data_ptr(), scale.data_ptr(), N, y.data_ptr(), N,
                           torch.get_num_threads())
    else:
        lib.dsm_qgemm_int4(x32.data_ptr(), K, M, K, q.data_ptr(), scale.data_ptr(), _group_size(q, scale), N,
                           y.data_ptr(), N, torch.get_num_threads())
    return y if x.dtype is torch.float32 else y.to(x.dtype)


def per_expert(product: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], x_AK: torch.Tensor,
               q_E: torch.Tensor, scale_E: torch.Tensor, counts: list[int], width: int) -> torch.Tensor:
    """(A, width): ``product(rows, q_E[e], scale_E[e])`` for each expert's rows of x (sorted by expert,
    ``counts[e]`` of them), one call an expert: the grouped products' readable twins, forward and transposed."""
    y_AW = x_AK.new_empty(x_AK.shape[0], width)
    start = 0
    for e, n in enumerate(counts):
        if n:
            y_AW[start:start + n] = product(x_AK[start:start + n], q_E[e], scale_E[e])
        start += n
    return y_AW


def quant_matmul_grouped_reference(x_AK: torch.Tensor, q_E: torch.Tensor, scale_E: torch.Tensor,
                                   counts: list[int]) -> torch.Tensor:
    """(A, N): each expert's rows of x (sorted by expert, ``counts[e]`` of them) times its dequantised ``q_E[e]``
    transposed, one :func:`quant_matmul` per expert (codes (E, N, ...) and scales (E, N, ...) stacked)."""
    return per_expert(quant_matmul, x_AK, q_E, scale_E, counts, q_E.shape[1])


def quant_matmul_grouped(x_AK: torch.Tensor, q_E: torch.Tensor, scale_E: torch.Tensor,
                         counts: list[int]) -> torch.Tensor:
    """:func:`quant_matmul_grouped_reference` in one kernel call for all experts (``dsm_qgemm_int8_grouped``)
    where it serves: int8 codes, fp32 activations, CPU, no autograd; else that loop. One parallel region instead
    of one per expert, each waiting for its slowest thread, and no copy of each expert's output (measured:
    benchmarks/finetune.py qfwd, "one layer's experts")."""
    if sum(counts) != x_AK.shape[0] or len(counts) != q_E.shape[0]:
        raise ValueError(f"quant_matmul_grouped: counts (sum {sum(counts)}, {len(counts)} experts) do not fit x "
                         f"{tuple(x_AK.shape)} and codes {tuple(q_E.shape)}")
    lib = _kernel_for(x_AK)
    if (lib is None or q_E.dtype != torch.int8 or activations() != "fp32" or x_AK.shape[0] == 0
            or max(counts) > KERNEL_MAX_ROWS):
        return quant_matmul_grouped_reference(x_AK, q_E, scale_E, counts)
    E, N, K = q_E.shape
    _check(x_AK, q_E[0], scale_E[0], "quant_matmul_grouped")
    if not q_E.is_contiguous() or not scale_E.is_contiguous() or x_AK.dim() != 2:
        raise ValueError(f"quant_matmul_grouped: x must be (A, K) and q_E, scale_E contiguous (x "
                         f"{tuple(x_AK.shape)}, codes strides {q_E.stride()}, scales strides {scale_E.stride()})")
    len_E = torch.tensor(counts, dtype=torch.int64)
    start_E = torch.cumsum(len_E, 0) - len_E
    x32 = x_AK.float().contiguous()
    y = torch.empty(x_AK.shape[0], N, dtype=torch.float32)
    lib.dsm_qgemm_int8_grouped(x32.data_ptr(), K, N, E, start_E.data_ptr(), len_E.data_ptr(), q_E.data_ptr(),
                               scale_E.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y if x_AK.dtype is torch.float32 else y.to(x_AK.dtype)


def _q8_steps_groups(group_size: int) -> bool:
    """Whether the int8-activation tiles step through these int4 groups: they pair 32-column activation blocks
    with a group's two nibble halves, so a group is one block or a whole number of pairs (96 is neither: it takes
    the fp32-activation tiles)."""
    return group_size == 32 or group_size % 64 == 0


def _kernel_for(x: torch.Tensor) -> Any:
    """The compiled library when it can serve x (CPU, no autograd, not inside ``reference_paths()`` or a trace),
    else None: then the dequantise-and-multiply twins run, as the float kernels' plain paths do."""
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()) or not fast_paths_enabled():
        return None
    return load_library()


def layout_key(t: torch.Tensor | None) -> tuple[object, ...] | None:
    """What a fused call's remembered arguments depend on in a tensor (kernels/mla_one_token.py, moe_one_token.py):
    its address, dtype, shape, strides and device kind. A tensor allocated where a freed one was, alike in all of
    these, gets the same arguments, rightly: they hold addresses and formats, never values."""
    return None if t is None else (t.data_ptr(), t.dtype, t.shape, t.stride(), t.is_cpu)


def remembered(table: dict[Any, Any], key: Any, make: Callable[[], Any], limit: int = 1024) -> Any:
    """``table[key]``, made by ``make()`` the first time (a fused call's checked arguments, by ``layout_key`` and
    the like). ``limit``: the layers of the models a process holds; the table is cleared when full. Exceptions are
    not remembered: bad weights are named every call."""
    if key in table:
        return table[key]
    value = make()
    if len(table) >= limit:
        table.clear()
    table[key] = value
    return value


def _group_size(q: torch.Tensor, scale: torch.Tensor) -> int:
    return 2 * q.shape[1] // scale.shape[1]  # the kernel's SIMD paths need a multiple of 32


def kernel_available() -> bool:
    return load_library() is not None


def kernel_isa() -> str | None:
    """The instruction set the kernel runs ("avx512vnni", "avx512", "avx2" or "scalar"), or None when there is no
    kernel."""
    lib = load_library()
    return None if lib is None else cpu_build.ISAS[lib.dsm_get_isa()]


def supported_isas() -> list[str]:
    """The kernel's instruction sets this CPU can run (empty when there is no kernel)."""
    lib = load_library()
    return [] if lib is None else cpu_build.supported_isas(lib)


# The integer dot product each instruction set's int8-activation tiles use (avx512 without VNNI runs AVX2's).
INT8_DOT = {"scalar": "scalar", "avx2": "avx2 vpmaddubsw", "avx512": "avx2 vpmaddubsw",
            "avx512vnni": "avx512vnni vpdpbusd"}


class KernelReport(TypedDict):
    quant_matmul: str | None
    activations: str
    int8_dot: str | None
    supported: list[str]


def kernel_report() -> KernelReport:
    """Which path the quantised matmuls take on this machine, for ``info`` and benchmarks: the instruction set
    (None: no compiled kernel, the dequantise-then-matmul path runs, with fp32 activations), the activations the
    kernel multiplies with, the integer dot product of the int8-activation path (None with fp32 activations),
    and the instruction sets this CPU could run."""
    isa = kernel_isa()
    acts = activations() if isa is not None else "fp32"
    return KernelReport(quant_matmul=isa, activations=acts,
                        int8_dot=INT8_DOT[isa] if isa is not None and acts == "int8" else None,
                        supported=supported_isas())


def set_kernel_isa(isa: str) -> None:
    """Make the kernel use ``isa`` from now on (tests, benchmarks); ValueError if this CPU cannot run it."""
    lib = load_library()
    if lib is None:
        raise ValueError("no compiled kernel (no C++ compiler, or DEEPSEEK_MOE_KERNELS=0): nothing to set")
    cpu_build.set_isa(lib, isa)


def set_strip_rows(rows: int) -> int:
    """From ``rows`` rows of x on, products with fp32 activations take the kernel's strip path (a panel of W
    widened once to fp32, a 6 x 16 register tile over every row) instead of the decode tiles; returns the
    previous value. Tests and benchmarks compare the two paths in one process (a huge value: decode tiles only)."""
    lib = load_library()
    if lib is None:
        raise ValueError("no compiled kernel (no C++ compiler, or DEEPSEEK_MOE_KERNELS=0): nothing to set")
    return int(lib.dsm_set_strip_rows(rows))


def strip_rows() -> int | None:
    """The row count from which the kernel's fp32-activation products take the strip path (None: no kernel)."""
    lib = load_library()
    return None if lib is None else int(lib.dsm_get_strip_rows())


# ----------------------------------------------------------------------------------------------------------
# The routed experts of one layer in one call


def experts_reference(x_AD: torch.Tensor, counts_E: torch.Tensor, gates_A: torch.Tensor | None,
                      w: dict[str, tuple[torch.Tensor, torch.Tensor]], activations: str = "fp32") -> torch.Tensor:
    """Readable twin of :func:`quant_experts`: per expert, SwiGLU on its rows with dequantised weights
    (``activations="int8"``: each matmul as :func:`quant_matmul_q8_reference`, so h is quantised too).
    ``w`` maps "w1"/"w2"/"w3" to stacked (codes (E, ...), scales (E, ...))."""
    y = x_AD.new_zeros(x_AD.shape[0], w["w2"][0].shape[1])
    mm = quant_matmul_q8_reference if activations == "int8" else quant_matmul_reference
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            x = x_AD[start:start + n].float()
            h = F.silu(mm(x, w["w1"][0][e], w["w1"][1][e])) * mm(x, w["w3"][0][e], w["w3"][1][e])
            if gates_A is not None:
                h = h * gates_A[start:start + n, None].float()
            y[start:start + n] = mm(h, w["w2"][0][e], w["w2"][1][e]).to(y.dtype)
        start += n
    return y


def quant_experts(x_AD: torch.Tensor, counts_E: torch.Tensor, gates_A: torch.Tensor | None,
                  w: dict[str, tuple[torch.Tensor, torch.Tensor]], group_size: int) -> torch.Tensor | None:
    """The fused C++ path of :func:`experts_reference`, or None when it does not apply (no kernel, autograd,
    or an expert with more than KERNEL_MAX_ROWS rows, or int4 groups the SIMD paths cannot step through)."""
    counts = counts_E.tolist()
    _check_experts(x_AD, counts, gates_A, w, group_size)
    lib = _experts_kernel(x_AD, w, group_size)
    if lib is None or max(counts, default=0) > KERNEL_MAX_ROWS:
        return None
    active = [(e, n) for e, n in enumerate(counts) if n]
    starts = list(itertools.accumulate(counts, initial=0))
    items = [[e for e, _ in active], [starts[e] for e, _ in active], [n for _, n in active]]
    return _run_experts(lib, x_AD.float().contiguous(), items, gates_A, w, group_size).to(x_AD.dtype)


def quant_experts_one_token(x_1D: torch.Tensor, experts_K: torch.Tensor, gates_K: torch.Tensor,
                            w: dict[str, tuple[torch.Tensor, torch.Tensor]], group_size: int) -> torch.Tensor | None:
    """One token (a batch-1 decode step) through its K selected experts in one kernel call: row k of the (K, D)
    result is expert ``experts_K[k]``'s output gated by ``gates_K[k]``, what :func:`quant_experts` gives the
    token's row repeated K times and sorted by expert, without the sort, counts, gather and scatter around it
    (about twenty small tensor operations a MoE layer, at decode a cost comparable to the products). None where
    the kernel does not apply."""
    K = experts_K.shape[0] if experts_K.dim() == 1 else -1
    if x_1D.dim() != 2 or x_1D.shape[0] != 1 or K < 0 or gates_K.shape != (K,):
        raise ValueError(f"quant_experts_one_token: x {tuple(x_1D.shape)} must be (1, D), experts "
                         f"{tuple(experts_K.shape)} and gates {tuple(gates_K.shape)} (K,)")
    lib = _experts_kernel(x_1D, w, group_size)
    if lib is None:
        return None  # before any copy or device sync: the caller's sorted path runs instead
    experts = experts_K.tolist()
    counts = [0] * w["w1"][0].shape[0]
    for e in experts:
        if not 0 <= e < len(counts):
            raise ValueError(f"quant_experts_one_token: expert index {e} outside 0..{len(counts) - 1}")
        counts[e] += 1
    x_KD = x_1D.float().expand(K, -1).contiguous()  # the token's row K times (a few KB): each item reads its own
    _check_experts(x_KD, counts, gates_K, w, group_size)
    # Item k: expert experts[k] on row k alone (the kernel needs no sorting; a repeated expert is two items).
    return _run_experts(lib, x_KD, [experts, list(range(K)), [1] * K], gates_K, w, group_size).to(x_1D.dtype)


def _int4(w: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return any(w[n][0].dtype == torch.uint8 for n in ("w1", "w2"))


def _experts_kernel(x: torch.Tensor, w: dict[str, tuple[torch.Tensor, torch.Tensor]], group_size: int) -> Any:
    """The library when the fused experts can serve x and w (``_kernel_for``, and int4 groups the SIMD paths
    step through), else None."""
    lib = _kernel_for(x)
    return None if lib is None or (_int4(w) and group_size % 32) else lib


def _run_experts(lib: Any, x32: torch.Tensor, items: list[list[int]], gates_A: torch.Tensor | None,
                 w: dict[str, tuple[torch.Tensor, torch.Tensor]], group_size: int) -> torch.Tensor:
    """dsm_experts(_q8) over ``items`` (expert, first row, rows) of x32 (A, D) fp32 contiguous -> (A, D) fp32."""
    int4 = _int4(w)
    meta = torch.tensor(items, dtype=torch.int64)
    A, D = x32.shape
    (w1, s1), (w3, s3), (w2, s2) = w["w1"], w["w3"], w["w2"]
    F_ = w1.shape[1]
    y = torch.empty(A, D)
    active = items[0]
    g = None if gates_A is None else gates_A.float().contiguous()
    if activations() == "int8" and (not int4 or _q8_steps_groups(group_size)):
        h = torch.empty(A, F_)
        lib.dsm_experts_q8(x32.data_ptr(), A, D, F_, len(active), meta[0].data_ptr(), meta[1].data_ptr(),
                           meta[2].data_ptr(), w1.data_ptr(), w3.data_ptr(), s1.data_ptr(), s3.data_ptr(),
                           8 if w1.dtype == torch.int8 else 4, w2.data_ptr(), s2.data_ptr(),
                           8 if w2.dtype == torch.int8 else 4, group_size, None if g is None else g.data_ptr(),
                           h.data_ptr(), y.data_ptr(), torch.get_num_threads())
        return y
    h1, h3 = torch.empty(A, F_), torch.empty(A, F_)
    lib.dsm_experts(x32.data_ptr(), A, D, F_, len(active), meta[0].data_ptr(), meta[1].data_ptr(),
                    meta[2].data_ptr(), w1.data_ptr(), w3.data_ptr(), s1.data_ptr(), s3.data_ptr(),
                    8 if w1.dtype == torch.int8 else 4, w2.data_ptr(), s2.data_ptr(),
                    8 if w2.dtype == torch.int8 else 4, group_size, None if g is None else g.data_ptr(),
                    h1.data_ptr(), h3.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y


def _check_experts(x_AD: torch.Tensor, counts: list[int], gates_A: torch.Tensor | None,
                   w: dict[str, tuple[torch.Tensor, torch.Tensor]], group_size: int) -> None:
    """ValueError naming the argument unless the stacked weights, counts and gates fit x (as :func:`_check`;
    on shapes and dtypes only: this runs once per MoE layer per decoded token)."""
    if x_AD.dim() != 2:
        raise ValueError(f"quant_experts: x must be (A, D), got shape {tuple(x_AD.shape)}")
    A, D = x_AD.shape
    E = len(counts)
    if sum(counts) != A:
        raise ValueError(f"quant_experts: counts sum to {sum(counts)}, x has {A} rows")
    if gates_A is not None and gates_A.shape != (A,):
        raise ValueError(f"quant_experts: gates has shape {tuple(gates_A.shape)}, expected ({A},)")
    F_ = w["w1"][0].shape[1] if w["w1"][0].dim() == 3 else -1
    for name, width, rows in (("w1", D, F_), ("w3", D, F_), ("w2", F_, D)):
        codes, scales = w[name]
        what = f"quant_experts: {name}"
        want: tuple[tuple[int, ...], torch.dtype, tuple[int, ...]]
        if codes.dtype == torch.int8:
            want = ((E, rows, width), INT8_SCALE_DTYPE, (E, rows))
        elif codes.dtype == torch.uint8:
            want = ((E, rows, width // 2), INT4_SCALE_DTYPE, (E, rows, width // group_size if group_size else -1))
        else:
            raise ValueError(f"{what} codes must be int8 or uint8 (int4), got {codes.dtype}")
        if tuple(codes.shape) != want[0]:
            raise ValueError(f"{what} codes have shape {tuple(codes.shape)}, expected {want[0]} for {E} experts "
                             f"(w1, w3: (E, F, D), w2: (E, D, F); int4 halves the last)")
        if scales.dtype != want[1]:
            raise ValueError(f"{what}: scale is {scales.dtype}; {'int8' if want[1] == INT8_SCALE_DTYPE else 'int4'} "
                             f"codes need {want[1]} scales (an {scales.dtype} scale would be misread)")
        if tuple(scales.shape) != want[2] or (codes.dtype == torch.uint8 and width % group_size):
            raise ValueError(f"{what} scales have shape {tuple(scales.shape)}, expected {want[2]} "
                             f"(group_size {group_size})")
        for part, t in (("codes", codes), ("scales", scales)):
            if not t.is_contiguous():
                raise ValueError(f"{what} {part} are not contiguous; pass them .contiguous()")
            if t.device != x_AD.device:
                raise ValueError(f"{what} {part} are on {t.device}, x on {x_AD.device}")
    if w["w1"][0].dtype != w["w3"][0].dtype:
        raise ValueError(f"quant_experts: w1 ({w['w1'][0].dtype}) and w3 ({w['w3'][0].dtype}) must share a format")
