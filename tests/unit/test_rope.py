"""RoPE and YaRN against transformers' DeepSeek-V2/V3 functions (the io parity tests depend on this)."""

import math

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb as hf_v2_apply_rotary
from transformers.models.deepseek_v2.modeling_deepseek_v2 import yarn_apply_mscale
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.model.rope import (
    RotaryEmbedding,
    apply_rotary,
    attention_factor,
    inverse_frequencies,
    softmax_scale,
)

R = 16


def _cfg(**overrides: object) -> ModelConfig:
    base = dict(vocab_size=32, dim=32, inter_dim=64, n_layers=1, n_dense_layers=1, n_heads=2,
                moe=MoEConfig(dim=32, moe_inter_dim=8, n_routed_experts=2, n_activated_experts=1),
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=R, v_head_dim=8)
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


def _hf_rope_parameters(cfg: ModelConfig) -> dict[str, object]:
    if cfg.rope_factor == 1.0:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len, "beta_fast": cfg.beta_fast,
            "beta_slow": cfg.beta_slow, "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale_all_dim}


YARN_CASES = [
    dict(),
    dict(rope_factor=40.0, original_seq_len=4096, mscale=0.707, mscale_all_dim=0.707),  # V2 / V2-Lite
    dict(rope_factor=40.0, original_seq_len=4096, mscale=1.0, mscale_all_dim=1.0),  # V3
    dict(rope_factor=4.0, original_seq_len=256, mscale=1.0, mscale_all_dim=0.0),  # attention factor != 1
]


@pytest.mark.parametrize("overrides", YARN_CASES)
def test_inverse_frequencies_and_scales_match_transformers(overrides: dict[str, object]) -> None:
    cfg = _cfg(**overrides)
    hf_cfg = DeepseekV3Config(qk_rope_head_dim=R, qk_nope_head_dim=8, num_attention_heads=2, hidden_size=32,
                              max_position_embeddings=cfg.max_seq_len, rope_parameters=_hf_rope_parameters(cfg))
    rope_type = "yarn" if cfg.rope_factor > 1 else "default"
    if rope_type == "yarn":
        hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    else:
        hf_inv_freq, hf_factor = hf_v3.DeepseekV3RotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    torch.testing.assert_close(inverse_frequencies(cfg), hf_inv_freq)
    assert attention_factor(cfg) == pytest.approx(hf_factor)
    hf_scale = yarn_apply_mscale(hf_cfg.rope_parameters, (cfg.qk_head_dim) ** -0.5)
    assert softmax_scale(cfg) == pytest.approx(hf_scale)


def test_v3_softmax_scale_is_mscale_squared() -> None:
    cfg = _cfg(rope_factor=40.0, mscale=1.0, mscale_all_dim=1.0)
    m = 0.1 * math.log(40.0) + 1.0
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim ** -0.5 * m * m)


def _angles(cfg: ModelConfig, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryEmbedding(cfg)(torch.arange(T)[None])  # (1, T, R/2)


def test_interleaved_matches_v2_complex_rotation() -> None:
    cfg = _cfg(rope_factor=40.0, mscale=1.0, mscale_all_dim=0.0)  # attention factor != 1 exercises scaling
    cos, sin = _angles(cfg, 7)
    q, k = torch.randn(1, 7, 3, R), torch.randn(1, 7, 1, R)
    freqs_cis = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos)) * attention_factor(cfg)
    hf_q, hf_k = hf_v2_apply_rotary(q.transpose(1, 2), k.transpose(1, 2), freqs_cis)  # HF: (B, H, T, R)
    torch.testing.assert_close(apply_rotary(q, cos, sin, interleave=True), hf_q.transpose(1, 2))
    torch.testing.assert_close(apply_rotary(k, cos, sin, interleave=True), hf_k.transpose(1, 2))


def test_split_halves_matches_v3_rotate_half() -> None:
    cfg = _cfg()
    cos, sin = _angles(cfg, 5)
    q, k = torch.randn(1, 5, 2, R), torch.randn(1, 5, 1, R)
    hf_cos, hf_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    hf_q, hf_k = hf_v3.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), hf_cos, hf_sin)
    torch.testing.assert_close(apply_rotary(q, cos, sin, interleave=False), hf_q.transpose(1, 2))
    torch.testing.assert_close(apply_rotary(k, cos, sin, interleave=False), hf_k.transpose(1, 2))


def test_v3_interleave_gives_the_same_dot_products() -> None:
    """V3's transformers code writes the rotated pairs de-interleaved; q·k is unchanged."""
    cfg = _cfg()
    cos, sin = _angles(cfg, 6)
    q, k = torch.randn(1, 6, 1, R), torch.randn(1, 6, 1, R)
    hf_cos, hf_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    hf_q, hf_k = hf_v3.apply_rotary_pos_emb_interleave(q.transpose(1, 2), k.transpose(1, 2), hf_cos, hf_sin)
    ours = apply_rotary(q, cos, sin, True)[:, :, 0] @ apply_rotary(k, cos, sin, True)[:, :, 0].transpose(1, 2)
    theirs = hf_q[:, 0] @ hf_k[:, 0].transpose(1, 2)
    torch.testing.assert_close(ours, theirs)


def test_rotation_is_relative() -> None:
    """<rot(q, m), rot(k, n)> depends only on m - n."""
    cfg = _cfg()
    rope = RotaryEmbedding(cfg)
    q, k = torch.randn(1, 1, 1, R), torch.randn(1, 1, 1, R)

    def score(m: int, n: int) -> torch.Tensor:
        cq, sq = rope(torch.tensor([[m]]))
        ck, sk = rope(torch.tensor([[n]]))
        return (apply_rotary(q, cq, sq, True) * apply_rotary(k, ck, sk, True)).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("R", "offset"), [(64, 128), (16, 0), (6, 2), (10, 4)])  # 3 and 5 pairs: vector tails
def test_inference_rotation_as_complex_product_equals_the_plain_one(dtype: torch.dtype, R: int, offset: int) -> None:
    """At inference the interleaved rotation multiplies complex pairs (5 aten calls instead of 11); it must give
    the plain lines' values exactly, on a view into a wider tensor as MLA's q_pe and k_pe are, and the plain
    lines must still run where the pairs cannot be viewed as complex (an odd offset) and under autograd."""
    from deepseek_moe.kernels.switch import reference_paths
    from deepseek_moe.model import rope

    g = torch.Generator().manual_seed(R)
    wide = torch.randn(2, 3, 4, offset + R + 2, generator=g).to(dtype)
    x = wide[..., offset:offset + R]
    angles = torch.rand(2, 3, R // 2, generator=g) * 50
    cos, sin = angles.cos() * 1.07, angles.sin() * 1.07
    calls = {"complex": 0}
    real_complex = torch.complex

    def counted(*args: torch.Tensor) -> torch.Tensor:
        calls["complex"] += 1
        return real_complex(*args)

    with torch.inference_mode():
        with reference_paths():
            want = rope.apply_rotary(x, cos, sin, interleave=True)
        torch.complex = counted  # type: ignore[assignment]
        try:
            got = rope.apply_rotary(x, cos, sin, interleave=True)
            odd = rope.apply_rotary(wide[..., 1:1 + R], cos, sin, interleave=True)  # odd offset: the plain lines
        finally:
            torch.complex = real_complex  # type: ignore[assignment]
    # bf16 is widened into a fresh tensor first, whose pairs always view as complex; fp32/fp64 are read in place
    assert calls["complex"] == (2 if dtype is torch.bfloat16 else 1)
    assert got.dtype == dtype
    # The same products and sums; torch's scalar loop for a row's last pairs (not a whole vector of them) may fuse
    # a multiply-add, so exact equality is asked only where the pairs fill vectors (R/2 a multiple of 8: every
    # DeepSeek model's 64, the tiny preset's 16).
    if (R // 2) % 8 == 0:
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if dtype is not torch.bfloat16:  # read in place at an odd offset: the plain lines, so exactly their values
        with reference_paths():
            assert torch.equal(odd, rope.apply_rotary(wide[..., 1:1 + R], cos, sin, interleave=True))
    trained = x.detach().float().requires_grad_()
    calls["complex"] = 0
    torch.complex = counted  # type: ignore[assignment]
    try:
        rope.apply_rotary(trained, cos, sin, interleave=True).sum().backward()  # autograd: the plain lines
    finally:
        torch.complex = real_complex  # type: ignore[assignment]
    assert calls["complex"] == 0 and trained.grad is not None


def test_rotation_traces_as_one_graph_in_training_and_at_inference() -> None:
    """torch.compile (fullgraph, dynamo only: the eager backend) traces the rotation without a break: the fast
    path's guard asks whether torch traces before reading the reference switch, which dynamo cannot trace, and a
    traced rotation takes the plain lines."""
    from deepseek_moe.model.rope import apply_rotary

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 4, 64, generator=g)
    cos, sin = torch.rand(1, 3, 32, generator=g), torch.rand(1, 3, 32, generator=g)
    compiled = torch.compile(lambda t: apply_rotary(t, cos, sin, True), backend="eager", fullgraph=True)
    trained = x.clone().requires_grad_()
    assert torch.equal(compiled(trained), apply_rotary(x, cos, sin, True))
    with torch.inference_mode():
        assert torch.equal(compiled(x), apply_rotary(x, cos, sin, True))
