"""kernels/mla_decode.cpp: absorbed MLA attention for a few new tokens per row, against the obvious einsums."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from quant_kernel_paths import build_with

from deepseek_moe.kernels import cpu_build
from deepseek_moe.kernels.mla_decode import MAX_NEW_TOKENS, absorbed_decode, prepare
from deepseek_moe.kernels.switch import reference_paths
from deepseek_moe.model.rope import apply_rotary

pytestmark = pytest.mark.skipif(cpu_build.load_mla_decode_library() is None, reason="no C++ compiler for the kernel")


def reference(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
              mask: torch.Tensor | None, w_uk: torch.Tensor, w_uv_t: torch.Tensor, scale: float) -> torch.Tensor:
    """DeepSeek-V2's absorbed attention in float64 einsums: (B, T, H, V). mask None: the T new tokens are the last
    T slots, each seeing itself and every slot before it."""
    T, S = q_nope.shape[1], kv.shape[1]
    qn, qp, kv, k_pe = q_nope.double(), q_pe.double(), kv.double(), k_pe.double()
    q_lat = torch.einsum("bthn,hnc->bthc", qn, w_uk.double())
    scores = (torch.einsum("bthc,bsc->bhts", q_lat, kv) + torch.einsum("bthr,bsr->bhts", qp, k_pe)) * scale
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None]
    o_lat = torch.einsum("bhts,bsc->bthc", scores.masked_fill(~mask, float("-inf")).softmax(-1), kv)
    return torch.einsum("bthc,hcv->bthv", o_lat, w_uv_t.double()).float()


def case(B: int, H: int, N: int, R: int, C: int, V: int, S: int, spare: int = 0, seed: int = 0, T: int = 1):
    """Operands laid out as the model has them: q_nope and q_pe split from one projection of T new tokens, the
    cache's slots a view of a longer buffer (``spare`` slots past S)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, N + R, generator=g)
    q_nope, q_pe = q.split([N, R], dim=-1)
    kv = torch.randn(B, S + spare, C, generator=g)[:, :S]
    k_pe = torch.randn(B, S + spare, R, generator=g)[:, :S]
    w_uk = torch.randn(H, N, C, generator=g) / N ** 0.5
    w_uv_t = torch.randn(H, C, V, generator=g) / C ** 0.5
    return q_nope, q_pe, kv, k_pe, w_uk, w_uv_t


@pytest.mark.parametrize(("B", "H", "N", "R", "C", "V", "S"), [
    (1, 8, 128, 64, 256, 128, 1),   # the mid-size model's shapes, one cached slot
    (1, 8, 128, 64, 256, 128, 75),  # ... slots not a multiple of the kernel's groups of 4 and chunks of 16
    (2, 16, 32, 16, 64, 32, 300),   # full head and column tiles, two rows
    (3, 3, 20, 6, 40, 12, 17),      # edge tiles only: 3 heads, 40 latent columns, odd widths
    (1, 1, 8, 4, 8, 8, 2),          # a single head
])
@pytest.mark.parametrize("spare", [0, 5])
@pytest.mark.parametrize("T", [1, 3])  # a decode step; a speculative verification (causal among the new tokens)
def test_matches_the_einsum_reference(B: int, H: int, N: int, R: int, C: int, V: int, S: int, spare: int,
                                      T: int) -> None:
    S = max(S, T)
    ops = case(B, H, N, R, C, V, S, spare, T=T)
    with torch.inference_mode():
        got = absorbed_decode(*ops[:4], None, *ops[4:], 0.3)
    assert got is not None and got.shape == (B, T, H, V)
    torch.testing.assert_close(got, reference(*ops[:4], None, *ops[4:], 0.3), rtol=1e-4, atol=1e-5)


def test_the_causal_default_is_what_an_explicit_causal_mask_gives() -> None:
    """No mask at T > 1 means causal among the new tokens: the first new token must not see the later ones."""
    B, T, S = 2, 4, 11
    ops = case(B, 6, 16, 8, 32, 16, S, T=T, seed=3)
    causal = torch.ones(T, S, dtype=torch.bool).tril(S - T).expand(B, 1, T, S)
    with torch.inference_mode():
        default = absorbed_decode(*ops[:4], None, *ops[4:], 0.25)
        explicit = absorbed_decode(*ops[:4], causal, *ops[4:], 0.25)
        everything = absorbed_decode(*ops[:4], torch.ones(B, 1, T, S, dtype=torch.bool), *ops[4:], 0.25)
    assert default is not None and explicit is not None and everything is not None
    torch.testing.assert_close(default, explicit)
    torch.testing.assert_close(default[:, -1], everything[:, -1])  # the last new token sees every slot anyway
    assert not torch.allclose(default[:, 0], everything[:, 0])


@pytest.mark.parametrize("T", [1, 2])
def test_a_mask_hides_slots_per_row(T: int) -> None:
    """Padding in a batch: masked slots get no weight; a row may see a different set than its neighbour."""
    B, S = 3, 23
    ops = case(B, 5, 16, 8, 48, 16, S, spare=3, seed=1, T=T)
    mask = torch.ones(B, 1, T, S, dtype=torch.bool).tril(S - T)
    mask[0, ..., :7] = False  # left padding
    mask[2, ..., 1::3] = False
    with torch.inference_mode():
        got = absorbed_decode(*ops[:4], mask, *ops[4:], 0.2)
        unmasked = absorbed_decode(*ops[:4], None, *ops[4:], 0.2)  # causal only
    assert got is not None and unmasked is not None
    torch.testing.assert_close(got, reference(*ops[:4], mask, *ops[4:], 0.2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], unmasked[1])  # row 1 sees everything either way
    assert not torch.allclose(got[0], unmasked[0])  # the mask mattered (the comparison above proves something)


def test_declines_what_it_does_not_serve() -> None:
    """None (the caller's PyTorch path runs) for more new tokens than MAX_NEW_TOKENS (a prefill), bf16, autograd,
    and inside reference_paths()."""
    ops = case(1, 4, 16, 8, 32, 16, 40)
    q_nope, q_pe, kv, k_pe, w_uk, w_uv_t = ops
    with torch.inference_mode():
        many = (q_nope.expand(1, MAX_NEW_TOKENS + 1, -1, -1), q_pe.expand(1, MAX_NEW_TOKENS + 1, -1, -1))
        assert absorbed_decode(*many, kv, k_pe, None, w_uk, w_uv_t, 0.1) is None
        assert absorbed_decode(q_nope.bfloat16(), q_pe, kv, k_pe, None, w_uk, w_uv_t, 0.1) is None
        with reference_paths():
            assert absorbed_decode(*ops[:4], None, *ops[4:], 0.1) is None
    assert absorbed_decode(*ops[:4], None, *ops[4:], 0.1) is None  # gradients enabled


def test_shapes_that_do_not_fit_are_named() -> None:
    q_nope, q_pe, kv, k_pe, w_uk, w_uv_t = case(1, 4, 16, 8, 32, 16, 9)
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"w_uk \(4, 16, 31\)"):
            absorbed_decode(q_nope, q_pe, kv, k_pe, None, w_uk[..., :31].contiguous(), w_uv_t, 0.1)
        with pytest.raises(ValueError, match=r"mask \(1, 1, 1, 8\) torch.bool must be \(B, 1, T, S\)"):
            absorbed_decode(q_nope, q_pe, kv, k_pe, torch.ones(1, 1, 1, 8, dtype=torch.bool), w_uk, w_uv_t, 0.1)


def test_declines_more_new_tokens_than_slots_and_a_fully_masked_row_is_nan() -> None:
    """T > S cannot be T new tokens among S slots: None, the caller's path decides. A row that may see no slot
    gives NaN, as softmax over nothing but -inf does in torch."""
    q_nope, q_pe, kv, k_pe, w_uk, w_uv_t = case(2, 4, 16, 8, 32, 16, 2, T=3)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1] = False
    with torch.inference_mode():
        assert absorbed_decode(q_nope, q_pe, kv, k_pe, None, w_uk, w_uv_t, 0.1) is None
        ops = case(2, 4, 16, 8, 32, 16, 6)
        got = absorbed_decode(*ops[:4], mask, *ops[4:], 0.1)
    assert got is not None and bool(got[1].isnan().all()) and not bool(got[0].isnan().any())


def test_the_baseline_build_matches_the_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """-DDSM_NO_SIMD builds what a CPU without the AVX2 clone (or another compiler) runs: the same answers."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    lib = build_with(cpu_build.MLA_DECODE_SOURCE, (*cpu_build.FLAGS, "-DDSM_NO_SIMD"), tmp_path, monkeypatch)
    assert lib is not None
    monkeypatch.setattr(cpu_build, "load_mla_decode_library", lambda: cpu_build.configure_mla_decode(lib))
    ops = case(2, 6, 20, 8, 40, 12, 19, spare=2, T=2, seed=5)
    with torch.inference_mode():
        got = absorbed_decode(*ops[:4], None, *ops[4:], 0.3)
    assert got is not None
    torch.testing.assert_close(got, reference(*ops[:4], None, *ops[4:], 0.3), rtol=1e-4, atol=1e-5)


def test_buffers_are_fp32_whatever_torch_default_dtype_is() -> None:
    """The kernel writes fp32: its output and scratch must not follow ``torch.set_default_dtype``."""
    ops = case(1, 4, 16, 8, 32, 16, 7)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.inference_mode():
            got = absorbed_decode(*ops[:4], None, *ops[4:], 0.3)
    finally:
        torch.set_default_dtype(before)
    assert got is not None and got.dtype == torch.float32
    torch.testing.assert_close(got, reference(*ops[:4], None, *ops[4:], 0.3), rtol=1e-4, atol=1e-5)


def prepare_reference(q_pe: torch.Tensor, kv_raw: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      w: torch.Tensor, eps: float, interleave: bool) -> tuple[torch.Tensor, ...]:
    """The model's own modules' formulas: (rotated q_pe, normalised latent, rotated key)."""
    C = w.shape[0]
    kv, k_pe = kv_raw[..., :C], kv_raw[..., C:]
    with reference_paths():
        rotated_key = apply_rotary(k_pe[:, :, None], cos, sin, interleave)[:, :, 0]
        rotated_q = apply_rotary(q_pe, cos, sin, interleave)
    return rotated_q, w * (kv * torch.rsqrt(kv.pow(2).mean(-1, keepdim=True) + eps)), rotated_key


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize(("B", "T", "H", "C", "R"), [(1, 1, 8, 256, 64), (2, 3, 3, 40, 6), (3, 2, 1, 8, 2)])
@pytest.mark.parametrize("build", ["clones", "baseline"])
def test_prepare_norms_rotates_and_writes_the_new_slots(interleave: bool, B: int, T: int, H: int, C: int, R: int,
                                                        build: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels/mla_decode.py ``prepare``: the latent's RMSNorm and the key's rotation into the cache's new slots
    (strided views of a longer buffer), the query's rotation returned, against RMSNorm's formula and apply_rotary
    (both layouts of the rotary pairs; the -DDSM_NO_SIMD build too); slots outside the new ones untouched."""
    if build == "baseline":
        if shutil.which("g++") is None:
            pytest.skip("needs g++")
        lib = build_with(cpu_build.MLA_DECODE_SOURCE, (*cpu_build.FLAGS, "-DDSM_NO_SIMD"), tmp_path, monkeypatch)
        assert lib is not None
        monkeypatch.setattr(cpu_build, "load_mla_decode_library", lambda: cpu_build.configure_mla_decode(lib))
    g = torch.Generator().manual_seed(B * 100 + T * 10 + C)
    q = torch.randn(B, T, H, 16 + R, generator=g)
    q_pe = q[..., 16:]  # the split view MLA passes: rows H * (16 + R) apart
    kv_raw = torch.randn(B, T, C + R, generator=g) * 2
    angles = torch.rand(B, T, R // 2, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    w = torch.rand(C, generator=g) + 0.5
    kv_buf, pe_buf = torch.full((B, T + 5, C), 7.0), torch.full((B, T + 5, R), 7.0)  # 2 slots before, 3 after
    with torch.inference_mode():
        got = prepare(q_pe, kv_raw, cos, sin, w, 0.5, interleave, kv_buf[:, 2:2 + T], pe_buf[:, 2:2 + T])
    assert got is not None
    want_q, want_kv, want_pe = prepare_reference(q_pe, kv_raw, cos, sin, w, 0.5, interleave)  # an eps that shows
    torch.testing.assert_close(got, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kv_buf[:, 2:2 + T], want_kv, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(pe_buf[:, 2:2 + T], want_pe, rtol=1e-6, atol=1e-6)
    for buf in (kv_buf, pe_buf):
        assert bool((buf[:, :2] == 7).all()) and bool((buf[:, 2 + T:] == 7).all())


def test_prepare_names_shapes_that_do_not_fit_and_declines_autograd() -> None:
    q_pe, kv_raw = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 12)
    cs = torch.randn(1, 1, 2)
    with torch.inference_mode(), pytest.raises(ValueError, match="mla prepare"):
        prepare(q_pe, kv_raw, cs, cs, torch.ones(8), 1e-6, True, torch.empty(1, 1, 7), torch.empty(1, 1, 4))
    assert prepare(q_pe, kv_raw, cs, cs, torch.ones(8), 1e-6, True, torch.empty(1, 1, 8), torch.empty(1, 1, 4)) is None


@pytest.mark.parametrize("interleave", [True, False])
def test_mla_decodes_through_prepare_as_through_its_modules(interleave: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """An MLA layer over a cache, decode steps (T = 1) and a verification (T = 3), with left padding in one row:
    with the prepare call, each step's output and the cache's contents are those of the same layer with it off;
    and where the kernel declines after the cache grew, the cache is rolled back and the plain path runs."""
    from deepseek_moe.model import mla as mla_module
    from deepseek_moe.model.causal_lm import attention_mask_4d, positions_of
    from deepseek_moe.model.kv_cache import LayerCache
    from deepseek_moe.model.rope import RotaryEmbedding
    from deepseek_moe.presets import tiny

    cfg = dataclasses.replace(tiny(), rope_interleave=interleave)
    torch.manual_seed(0)
    layer = mla_module.MLA(cfg).eval()
    rope = RotaryEmbedding(cfg)
    calls: list[bool] = []
    real = mla_module.prepare

    def counted(*args: object) -> object:
        out = real(*args)  # type: ignore[arg-type]
        calls.append(out is not None)
        return out

    def run(on: bool, decline: bool = False) -> tuple[list[torch.Tensor], LayerCache]:
        cache = LayerCache()
        key_mask = torch.tensor([[False, True, True, True], [True, True, True, True]])  # row 0 left-padded
        outs = []
        g = torch.Generator().manual_seed(1)
        with monkeypatch.context() as m:
            if not on:
                m.setattr(mla_module.MLA, "_prepares_in_cpp", lambda self, c, k: False)
            m.setattr(mla_module, "prepare", (lambda *a: None) if decline else counted)
            with torch.inference_mode():
                for T in (4, 1, 1, 3):
                    if T != 4:
                        key_mask = torch.cat([key_mask, torch.ones(2, T, dtype=torch.bool)], dim=1)
                    positions = positions_of(key_mask, T)
                    cos, sin = rope(positions)
                    x = torch.randn(2, T, cfg.dim, generator=g)
                    outs.append(layer(x, cos, sin, attention_mask_4d(key_mask, T), cache))
        return outs, cache

    got, cache = run(True)
    assert calls == [True] * 4, calls  # a short prefill, two decode steps, a verification
    want, cache_off = run(False)
    declined, cache_declined = run(True, decline=True)
    for a, b, c in zip(got, want, declined, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5)
    assert cache.length == cache_off.length == cache_declined.length == 9
    for a, b in zip(cache.grow(0)[1], cache_off.grow(0)[1], strict=True):  # views of every slot
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
