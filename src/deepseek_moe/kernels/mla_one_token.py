"""A whole MLA layer with quantised projections for a few new tokens (a decode step, a speculative verification)
in one C++ call (qgemm.cpp ``dsm_mla_one_token``).

At decode, each of MLA's ~15 Python-level steps (four quantised products, two norms, two rotations, the cache
write, the absorbed attention and the glue between) costs far more inside a decode step than its work: a
mid-size layer took ~900 us for ~300 us of kernels. This call runs the products (``dsm_qgemm_*``), the norm,
rotations and cache write (mla_decode.cpp ``dsm_mla_prepare``) and the attention (``dsm_mla_decode``) back to
back. The readable reference is MLA.forward's own path (``reference_paths()``), which the tests compare against.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from deepseek_moe.kernels import cpu_build
from deepseek_moe.kernels.mla_decode import MAX_NEW_TOKENS, mask_rows
from deepseek_moe.kernels.quant_layout import INT4_SCALE_DTYPE, INT8_SCALE_DTYPE
from deepseek_moe.kernels.quant_matmul import (
    _kernel_for,
    _q8_steps_groups,
    activations,
    layout_key,
    remembered,
)

Codes = tuple[torch.Tensor, torch.Tensor]  # a quantised matrix: codes (N, K) int8 or (N, K/2) uint8, scales
PROJECTIONS = ("wq_a", "wq_b", "wq", "wkv_a", "wo")


def _descriptor(w: Codes | None, K: int, N: int, name: str) -> list[int]:
    """{codes, scales, bits, group size, N, K, integer activations} as dsm_mla_one_token reads a projection; zeros
    for an absent one. ValueError naming the projection unless it maps K inputs to N outputs."""
    if w is None:
        return [0] * 7
    codes, scales = w
    bits = 8 if codes.dtype == torch.int8 else 4
    width = codes.shape[1] * (1 if bits == 8 else 2) if codes.dim() == 2 else -1
    gs = 0 if bits == 8 or scales.dim() != 2 or not scales.shape[1] else width // scales.shape[1]
    scale_ok = ((scales.dtype, tuple(scales.shape)) == (INT8_SCALE_DTYPE, (N,)) if bits == 8 else
                (scales.dtype, tuple(scales.shape)) == (INT4_SCALE_DTYPE, (N, K // gs if gs else -1)))
    if (codes.dtype not in (torch.int8, torch.uint8) or codes.dim() != 2 or codes.shape[0] != N or width != K
            or not scale_ok or not (codes.is_contiguous() and scales.is_contiguous())):
        raise ValueError(f"mla_one_token: {name} codes {tuple(codes.shape)} {codes.dtype} with scales "
                         f"{tuple(scales.shape)} {scales.dtype} do not map {K} inputs to {N} outputs as int8 (fp32 "
                         "scales a row) or int4 (fp16 scales a group), contiguous")
    q8 = activations() == "int8" and (bits == 8 or _q8_steps_groups(gs))
    return [codes.data_ptr(), scales.data_ptr(), bits, gs, N, K, int(q8)]


def mla_one_token(x: torch.Tensor, projections: dict[str, Codes | None], q_norm: tuple[torch.Tensor, float] | None,
                  kv_norm: tuple[torch.Tensor, float], cos: torch.Tensor, sin: torch.Tensor, interleave: bool,
                  heads: tuple[int, int, int, int, int], kv_all: torch.Tensor, pe_all: torch.Tensor,
                  mask: torch.Tensor | None, w_uk: torch.Tensor, w_uv_t: torch.Tensor,
                  scale: float) -> torch.Tensor | None:
    """x (B, T, D) fp32 through an MLA layer: ``projections`` maps wq_a, wq_b (or wq), wkv_a, wo to their codes
    and scales (None: absent); ``q_norm`` / ``kv_norm`` (weight, eps); cos/sin (B, T, R/2); ``heads`` (H, N, R, C,
    V); ``kv_all`` (B, S, C) / ``pe_all`` (B, S, R): views of every cache slot, the last T not yet written (the
    call writes them: LayerCache.grow); mask (B, 1, T, S) bool or None (causal); w_uk (H, N, C), w_uv_t (H, C, V)
    fp32 contiguous. Returns (B, T, D) fp32, or None where the call does not apply (then nothing was written).
    """
    lib = _kernel_for(x)
    mla = cpu_build.load_mla_decode_library()
    B, T, D = x.shape
    if lib is None or mla is None:
        return None
    step = step_tensors(x, cos, sin, kv_all, pe_all, mask, heads, "mla_one_token")
    if step is None:
        return None
    desc_t = projection_descriptors(D, projections, q_norm, kv_norm, heads, w_uk, w_uv_t)
    if desc_t is None:
        return None
    x, cos, sin, mask_bytes = step
    H, N, R, C, V = heads
    scratch = torch.empty(B * T * H * (2 * C + kv_all.shape[1]), dtype=torch.float32)
    y = torch.empty(B, T, D, dtype=torch.float32)
    lib.dsm_mla_one_token(
        x.data_ptr(), B, T, D, desc_t.data_ptr(), None if q_norm is None else q_norm[0].data_ptr(),
        0.0 if q_norm is None else q_norm[1], H, N, R, C, V, kv_norm[0].data_ptr(), kv_norm[1], cos.data_ptr(),
        sin.data_ptr(), int(interleave), kv_all.data_ptr(), kv_all.stride(0), kv_all.stride(1), pe_all.data_ptr(),
        pe_all.stride(0), pe_all.stride(1), kv_all.shape[1] - T, None if mask_bytes is None else mask_bytes.data_ptr(),
        w_uk.data_ptr(), w_uv_t.data_ptr(), scale, *entry_points(mla), scratch.data_ptr(), y.data_ptr(),
        torch.get_num_threads())
    return y


def step_tensors(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_all: torch.Tensor, pe_all: torch.Tensor,
                 mask: torch.Tensor | None, heads: tuple[int, int, int, int, int], what: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """A step's own operands of the one-call attention (this layer's, or a whole block's: kernels/block_one_token.py)
    checked against ``heads``: (x, cos, sin contiguous, the mask as the kernel reads it),
    or None where the step does not take the call (autograd, too many tokens, not fp32 on the CPU); ValueError
    naming ``what`` for a cache or rotary table that does not fit."""
    B, T, _ = x.shape
    H, N, R, C, V = heads
    if torch.is_grad_enabled() or not 0 < T <= MAX_NEW_TOKENS:
        return None
    S = kv_all.shape[1]
    if cos.dim() == 3 and cos.shape[0] == 1 and sin.shape == cos.shape:  # one table for every row, as rotary takes
        cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)
    if any(t.dtype != torch.float32 or not t.is_cpu or t.stride(-1) != 1 for t in (x, cos, sin, kv_all, pe_all)):
        return None
    if (kv_all.shape != (B, S, C) or pe_all.shape != (B, S, R) or cos.shape != (B, T, R // 2) or sin.shape != cos.shape
            or S < T):
        raise ValueError(f"{what}: x {tuple(x.shape)}, cache {tuple(kv_all.shape)} / {tuple(pe_all.shape)}, "
                         f"cos {tuple(cos.shape)} do not fit heads (H, N, R, C, V) = {heads}")
    return x.contiguous(), cos.contiguous(), sin.contiguous(), mask_rows(mask, B, T, S, what)


# The projections' descriptors as the call reads them, by everything their checks and contents depend on: the
# codes' and scales' addresses, dtypes, shapes and strides (a tensor allocated where a freed one was, alike in
# all of these, gets the same descriptor, rightly), the layer's sizes and the activation format. Checking and
# packing them took ~100 us of a ~250 us call on the default model; a lookup takes a few.
_DESCRIPTORS: dict[tuple[object, ...], torch.Tensor | None] = {}


def projection_descriptors(D: int, projections: dict[str, Codes | None],
                           q_norm: tuple[torch.Tensor, float] | None, kv_norm: tuple[torch.Tensor, float],
                           heads: tuple[int, int, int, int, int], w_uk: torch.Tensor,
                           w_uv_t: torch.Tensor) -> torch.Tensor | None:
    """The descriptor tensor of ``dsm_mla_one_token`` (:func:`_descriptor` of each projection, in PROJECTIONS'
    order), or None where the call does not apply (int4 groups the SIMD paths cannot step through, weights not
    fp32 on the CPU); ValueError for projections or weights that do not fit ``heads``. Memoised (above)."""
    weights = (w_uk, w_uv_t, kv_norm[0], *([] if q_norm is None else [q_norm[0]]))
    key = (activations(), D, heads,
           *(None if (w := projections.get(n)) is None else (layout_key(w[0]), layout_key(w[1])) for n in PROJECTIONS),
           *(layout_key(t) for t in weights))
    return remembered(_DESCRIPTORS, key, lambda: _checked_descriptors(D, projections, q_norm, kv_norm, heads, w_uk,
                                                                      w_uv_t, weights))


def _checked_descriptors(D: int, projections: dict[str, Codes | None], q_norm: tuple[torch.Tensor, float] | None,
                         kv_norm: tuple[torch.Tensor, float], heads: tuple[int, int, int, int, int],
                         w_uk: torch.Tensor, w_uv_t: torch.Tensor,
                         weights: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """:func:`projection_descriptors` without the memo (``weights``: the fp32 operands besides the codes)."""
    H, N, R, C, V = heads
    codes = [w for w in projections.values() if w is not None]
    if (any(c.dtype == torch.uint8 and (2 * c.shape[1] // s.shape[1]) % 32 for c, s in codes)  # int4 groups
            or any(not c.is_cpu or not s.is_cpu for c, s in codes)
            or any(t.dtype != torch.float32 or not t.is_cpu or t.stride(-1) != 1 for t in weights)):
        return None
    if (w_uk.shape != (H, N, C) or w_uv_t.shape != (H, C, V) or not w_uk.is_contiguous()
            or not w_uv_t.is_contiguous()):
        raise ValueError(f"mla_one_token: w_uk {tuple(w_uk.shape)}, w_uv_t {tuple(w_uv_t.shape)} do not fit "
                         f"heads (H, N, R, C, V) = {heads}")
    direct = projections.get("wq") is not None
    lora = all(projections.get(n) is not None for n in ("wq_a", "wq_b")) and q_norm is not None
    if direct == lora or any(projections.get(n) is None for n in ("wkv_a", "wo")):
        raise ValueError("mla_one_token: give wq alone, or wq_a and wq_b with q_norm; and wkv_a and wo")
    L = 0 if q_norm is None else q_norm[0].shape[0]
    desc = [*_descriptor(projections.get("wq_a"), D, L, "wq_a"),
            *_descriptor(projections.get("wq_b"), L, H * (N + R), "wq_b"),
            *_descriptor(projections.get("wq"), D, H * (N + R), "wq"),
            *_descriptor(projections["wkv_a"], D, C + R, "wkv_a"),
            *_descriptor(projections["wo"], H * V, D, "wo")]
    return torch.tensor(desc, dtype=torch.int64)


@functools.cache
def entry_points(mla: ctypes.CDLL) -> tuple[int | None, int | None]:
    """The addresses of mla_decode.cpp's prepare and decode steps, which the one call calls in turn."""
    return (ctypes.cast(mla.dsm_mla_prepare, ctypes.c_void_p).value,
            ctypes.cast(mla.dsm_mla_decode, ctypes.c_void_p).value)


__all__ = ["PROJECTIONS", "entry_points", "mla_one_token", "projection_descriptors", "step_tensors"]
