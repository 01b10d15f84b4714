"""Rotary position embeddings with DeepSeek's YaRN context extension.

The maths follows transformers' ``_compute_yarn_parameters`` and the DeepSeek-V2/V3 modeling files exactly, so
checkpoints loaded from the Hub give the same logits:

* inverse frequencies blend interpolated (``/ rope_factor``) and original frequencies with a linear ramp over
  the dimension range found from ``beta_fast`` / ``beta_slow`` (always, once ``rope_factor > 1``: transformers
  does not wait for the sequence to exceed ``original_seq_len`` as DeepSeek's reference code does);
* cos/sin are multiplied by an attention factor ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``;
* the softmax scale is multiplied by ``mscale(factor, mscale_all_dim) ** 2`` (see ``softmax_scale``).

``rope_interleave=True`` rotates adjacent pairs (x0, x1), (x2, x3), ... (DeepSeek's layout; V2's complex
view). V3's transformers code rotates the same pairs but writes the result de-interleaved; both q and k get
the same permutation, so their dot products, and the model's outputs, are equal. ``False`` rotates halves.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deepseek_moe.config import ModelConfig
from deepseek_moe.kernels.switch import fast_paths_enabled


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(cfg: ModelConfig) -> float:
    """The factor cos and sin are multiplied by (transformers' ``attention_factor``)."""
    if cfg.rope_factor <= 1.0:
        return 1.0
    if cfg.mscale and cfg.mscale_all_dim:
        return yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
    return yarn_mscale(cfg.rope_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek-V2 §B / HF config)."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.rope_factor > 1.0 and cfg.mscale_all_dim:
        m = yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
        scale = scale * m * m
    return scale


def _correction_dim(n_rotations: float, dim: int, base: float, max_seq_len: int) -> float:
    # The dimension whose wavelength completes n_rotations over max_seq_len positions.
    return dim * math.log(max_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies, shape (qk_rope_head_dim // 2,), float32."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    # Always on the CPU, even under a meta device context: the values are needed to materialise the model.
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    inv_freq = 1.0 / pos_freqs
    if cfg.rope_factor <= 1.0:
        return inv_freq
    # Dimensions that rotate fast (many turns over the original context) keep their frequency; slow ones are
    # interpolated by rope_factor; a linear ramp blends the range between.
    low = float(max(math.floor(_correction_dim(cfg.beta_fast, dim, base, cfg.original_seq_len)), 0))
    high = float(min(math.ceil(_correction_dim(cfg.beta_slow, dim, base, cfg.original_seq_len)), dim - 1))
    if low == high:
        high += 0.001  # avoid dividing by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    return inv_freq / cfg.rope_factor * ramp + inv_freq * extrapolation_weight


class RotaryEmbedding(nn.Module):
    """Maps positions (B, T) to (cos, sin), each (B, T, qk_rope_head_dim // 2), float32, attention-factor scaled.

    Holds no parameters or buffers: the few inverse frequencies are a function of the config, kept on the CPU
    and copied to the positions' device per call, so a model built on the meta device and materialised with
    ``to_empty`` needs no re-initialisation here, and nothing is sized for a maximum length.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inv_freq = inverse_frequencies(cfg)
        self.attention_factor = attention_factor(cfg)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(positions.device, non_blocking=True)
        freqs = positions[..., None].float() * inv_freq  # (B, T, R/2)
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x (B, T, H, R) by angles given as cos/sin (B, T, R/2); returns x's shape and dtype."""
    # Written for few aten calls (a decode step rotates twice per layer and pays per call, not per element).
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    inference = not (torch.is_grad_enabled() and x.requires_grad)
    if interleave and inference and fast_paths_enabled() and _pairs_as_complex(xf):
        # At inference: each adjacent pair as one complex number times cos + i sin, 8 aten calls a rotation
        # instead of 12, the same products and sums (ac - bd, ad + bc): equal to the lines below, bit for bit where
        # the pairs fill whole vectors (torch's scalar tail may fuse a multiply-add; tested).
        rotated = torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * torch.complex(cos, sin)
        out = torch.view_as_real(rotated).flatten(-2)
        return out if out.dtype == x.dtype else out.to(x.dtype)
    if interleave:
        x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)  # the even and the odd lanes
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _pairs_as_complex(x: torch.Tensor) -> bool:
    """Whether x's adjacent pairs of the last dimension can be viewed as complex numbers (view_as_complex needs the
    pairs contiguous and every other stride and the offset even)."""
    return (x.stride(-1) == 1 and x.storage_offset() % 2 == 0 and all(st % 2 == 0 for st in x.stride()[:-1])
            and x.device.type == "cpu")
