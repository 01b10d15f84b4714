"""Absorbed MLA attention for a few new tokens per row (a decode step, a speculative verification) in one C++
call (``mla_decode.cpp``).

At decode, MLA's absorbed attention is a few thousand multiply-adds per head, and as PyTorch calls (four batched
products, a softmax and ~20 reshapes, transposes and casts a layer) it cost more in calls than in arithmetic.
The readable reference is :meth:`deepseek_moe.model.mla.MLA._absorbed`; :func:`absorbed_decode` returns None
wherever the kernel does not apply (no compiler, autograd, not fp32, more than MAX_NEW_TOKENS new tokens, inside
``reference_paths()``), and the caller's PyTorch path runs.
"""

from __future__ import annotations

import torch

from deepseek_moe.kernels import cpu_build
from deepseek_moe.kernels.switch import fast_paths_enabled

# New tokens per row up to which the kernel runs: its scores are dot products, fine for a decode step or the
# k + 1 tokens of a speculative verification; a prefill's (T, S) scores are a GEMM, which torch does better.
MAX_NEW_TOKENS = 16


def kernel_available() -> bool:
    """Whether the compiled kernel serves MLA's decode steps here (for ``info`` and benchmarks)."""
    return cpu_build.load_mla_decode_library() is not None


def absorbed_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                    mask: torch.Tensor | None, w_uk: torch.Tensor, w_uv_t: torch.Tensor,
                    scale: float) -> torch.Tensor | None:
    """q_nope (B, T, H, N), q_pe (B, T, H, R) for T new tokens, the last T of S slots; kv (B, S, C), k_pe (B, S, R);
    mask (B, 1, T, S) bool (True: may attend) or None (causal: new token t sees slots 0 .. S - T + t); w_uk
    (H, N, C), w_uv_t (H, C, V): the attention output (B, T, H, V) in fp32, or None where the kernel does not
    apply. Operands must be fp32 with unit stride in their last dimension."""
    if not fast_paths_enabled() or torch.is_grad_enabled():
        return None
    B, T, H, N = q_nope.shape
    S, C = kv.shape[1], kv.shape[2]
    R, V = q_pe.shape[-1], w_uv_t.shape[-1]
    if not 0 < T <= min(S, MAX_NEW_TOKENS):
        return None
    tensors = (q_nope, q_pe, kv, k_pe, w_uk, w_uv_t)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1 for t in tensors):
        return None
    if (w_uk.shape != (H, N, C) or w_uv_t.shape != (H, C, V) or k_pe.shape != (B, S, R) or kv.shape[0] != B
            or q_pe.shape[:3] != (B, T, H)):
        raise ValueError(f"absorbed_decode: q_nope {tuple(q_nope.shape)}, q_pe {tuple(q_pe.shape)}, kv "
                         f"{tuple(kv.shape)}, k_pe {tuple(k_pe.shape)}, w_uk {tuple(w_uk.shape)}, w_uv_t "
                         f"{tuple(w_uv_t.shape)} do not fit (B, T, H, N), (B, T, H, R), (B, S, C), (B, S, R), "
                         "(H, N, C), (H, C, V)")
    if not (w_uk.is_contiguous() and w_uv_t.is_contiguous()):
        return None
    lib = cpu_build.load_mla_decode_library()
    if lib is None:
        return None
    q_nope, ld_qn = _query_rows(q_nope)
    q_pe, ld_qp = _query_rows(q_pe)
    mask_bytes = mask_rows(mask, B, T, S, "absorbed_decode")
    out = torch.empty(B, T, H, V, dtype=torch.float32)  # whatever torch's default dtype is
    scratch = torch.empty(B * T * H * (2 * C + S), dtype=torch.float32)
    lib.dsm_mla_decode(q_nope.data_ptr(), ld_qn, q_pe.data_ptr(), ld_qp, B, T, H, N, R, C, V, kv.data_ptr(),
                       kv.stride(0), kv.stride(1), k_pe.data_ptr(), k_pe.stride(0), k_pe.stride(1), S,
                       None if mask_bytes is None else mask_bytes.data_ptr(), w_uk.data_ptr(), w_uv_t.data_ptr(),
                       scale, out.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
    return out


def prepare(q_pe: torch.Tensor, kv_raw: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm_weight: torch.Tensor,
            eps: float, interleave: bool, kv_slots: torch.Tensor, pe_slots: torch.Tensor) -> torch.Tensor | None:
    """What MLA does between its projections and the cache, for T new tokens: the latent RMSNorm(kv_raw[..., :C])
    * norm_weight written into ``kv_slots`` (B, T, C), the rotary key rotate(kv_raw[..., C:]) into ``pe_slots``
    (B, T, R) (the cache's new slots, :meth:`LayerCache.grow`), and the rotated query q_pe (B, T, H, R) returned
    (contiguous fp32), in one C++ call instead of ~25 operations. kv_raw: wkv_a's output (B, T, C + R); cos/sin
    (B, T, R/2). None where the kernel does not apply (the caller's PyTorch path runs, nothing written)."""
    if not fast_paths_enabled() or torch.is_grad_enabled():
        return None
    B, T, H, R = q_pe.shape
    C = kv_slots.shape[-1]
    if cos.dim() == 3 and cos.shape[0] == 1 and sin.shape == cos.shape:  # one table for every row, as rotary takes
        cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)
    tensors = (q_pe, kv_raw, cos, sin, norm_weight, kv_slots, pe_slots)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1 for t in tensors) or R % 2:
        return None
    if (kv_raw.shape != (B, T, C + R) or kv_slots.shape != (B, T, C) or pe_slots.shape != (B, T, R)
            or cos.shape != (B, T, R // 2) or sin.shape != cos.shape or norm_weight.shape != (C,)):
        raise ValueError(f"mla prepare: q_pe {tuple(q_pe.shape)}, kv_raw {tuple(kv_raw.shape)}, cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin.shape)}, norm weight {tuple(norm_weight.shape)}, slots "
                         f"{tuple(kv_slots.shape)} / {tuple(pe_slots.shape)} do not fit (B, T, H, R), (B, T, C + R), "
                         "(B, T, R/2), (C,), (B, T, C) / (B, T, R)")
    lib = cpu_build.load_mla_decode_library()
    if lib is None:
        return None
    cos, sin, norm_weight = cos.contiguous(), sin.contiguous(), norm_weight.contiguous()
    out = torch.empty(B, T, H, R, dtype=torch.float32)
    lib.dsm_mla_prepare(kv_raw.data_ptr(), kv_raw.stride(0), kv_raw.stride(1), B, T, C, R, norm_weight.data_ptr(), eps,
                        cos.data_ptr(), sin.data_ptr(), int(interleave), kv_slots.data_ptr(), kv_slots.stride(0),
                        kv_slots.stride(1), pe_slots.data_ptr(), pe_slots.stride(0), pe_slots.stride(1),
                        q_pe.data_ptr(), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2), H, out.data_ptr())
    return out


def mask_rows(mask: torch.Tensor | None, B: int, T: int, S: int, what: str) -> torch.Tensor | None:
    """An attention mask (B, 1, T, S) bool (or one that broadcasts to it) as the kernel reads it: (B * T, S) bytes."""
    if mask is None:
        return None
    try:
        if mask.dtype != torch.bool:
            raise RuntimeError
        mask = mask.expand(B, 1, T, S)  # a (1, 1, T, S) mask is one for every row, as for the batched products
    except RuntimeError:
        raise ValueError(f"{what}: mask {tuple(mask.shape)} {mask.dtype} must be (B, 1, T, S) bool "
                         f"(or broadcast to it) for B={B}, T={T}, S={S}") from None
    return mask.reshape(B * T, S).contiguous().view(torch.uint8)


def _query_rows(q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(q, ld) with query row (b, t, h) of q (B, T, H, width) at ((b * T + t) * H + h) * ld: the kernel walks the
    rows at one stride, which the head-split views of one (B, T, H, ...) projection already have (no copy)."""
    B, T, H, width = q.shape
    ld = q.stride(2) if H > 1 else q.stride(1) if T > 1 else q.stride(0)
    if (T > 1 and q.stride(1) != H * ld) or (B > 1 and q.stride(0) != T * H * ld):
        return q.contiguous(), width
    return q, ld
