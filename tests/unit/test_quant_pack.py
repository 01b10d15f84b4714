"""Quantisation maths and packing: hand-checked codes, round trips, error bounds, the two int4 layouts."""

from __future__ import annotations

import pytest
import torch

from deepseek_moe.quant import pack


def test_int8_codes_by_hand() -> None:
    w = torch.tensor([[1.27, -0.635, 0.0], [0.0, 0.0, 0.0]])
    q, s = pack.quantize_int8(w)
    assert s.dtype == torch.float32 and torch.allclose(s, torch.tensor([0.01, 1.0]))
    assert q.tolist() == [[127, -64, 0], [0, 0, 0]]  # -63.5 rounds to even: -64


def test_int4_codes_and_portable_packing_by_hand() -> None:
    # One group of 4: amax 0.7 -> scale 0.1; codes 7, -7, 3, 0 -> stored +8: 15, 1, 11, 8.
    w = torch.tensor([[0.7, -0.7, 0.3, 0.0]])
    packed, s = pack.quantize_int4(w, 4)
    assert s.dtype == torch.float16 and s.shape == (1, 1)
    # byte 0: column 0 low nibble (15), column 1 high nibble (1); byte 1: 11 | 8 << 4
    assert packed.tolist() == [[15 | (1 << 4), 11 | (8 << 4)]]
    assert pack.unpack_int4(packed).tolist() == [[7, -7, 3, 0]]


@pytest.mark.parametrize("group", [32, 64])
def test_int4_round_trip_error_within_half_a_step(group: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    packed, s = pack.quantize_int4(w, group)
    deq = pack.dequantize_int4(packed, s)
    step = s.float().repeat_interleave(group, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()


def test_int8_round_trip_error_within_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(33, 100)
    q, s = pack.quantize_int8(w)
    assert ((pack.dequantize_int8(q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all()


def test_kernel_layout_round_trips_to_portable() -> None:
    torch.manual_seed(0)
    codes = torch.randint(-8, 8, (5, 128), dtype=torch.int8)
    portable = pack.pack_int4(codes)
    kernel = pack.repack_int4_for_kernel(portable, 64)
    assert not torch.equal(kernel, portable)
    assert torch.equal(pack.unpack_int4_kernel_layout(kernel, 64), codes)
    assert torch.equal(pack.portable_from_kernel_layout(kernel, 64), portable)


def test_int4_rejects_width_not_multiple_of_group() -> None:
    with pytest.raises(ValueError, match="multiple of group_size"):
        pack.quantize_int4(torch.randn(2, 48), 32)


def test_int4_group_whose_scale_float16_cannot_hold_is_an_error_naming_it() -> None:
    # Largest representable: max |w| = 7 * 65504 gives scale 65504 exactly; a little more rounds the scale to inf
    # (which used to become an inf scale and a NaN output row, silently).
    w = torch.zeros(3, 64)
    w[1, 40] = 7 * 65504.0
    packed, s = pack.quantize_int4(w, 32)
    assert torch.isfinite(s.float()).all() and pack.dequantize_int4(packed, s)[1, 40].item() == 7 * 65504.0
    w[2, 33] = -460_000.0
    with pytest.raises(ValueError, match=r"row 2, group 1 \(columns 32..63\) has max \|w\| = 460000.*float16"):
        pack.quantize_int4(w, 32)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("bits", [8, 4])
def test_non_finite_weights_are_an_error(bits: int, bad: float) -> None:
    w = torch.randn(4, 64)
    w[3, 50] = bad
    with pytest.raises(ValueError, match=r"inf or NaN \(row 3" + (r" group 1\)" if bits == 4 else r"\)")):
        pack.quantize_int8(w) if bits == 8 else pack.quantize_int4(w, 32)


def test_int4_group_too_small_for_a_float16_scale_quantises_to_zero_codes() -> None:
    w = torch.zeros(1, 32)
    w[0, :4] = torch.tensor([1e-9, -2e-9, 5e-10, 0.0])  # scale ~3e-10 rounds to 0 in float16
    packed, s = pack.quantize_int4(w, 32)
    assert s.item() == 0.0 and pack.unpack_int4(packed).eq(0).all()
    assert pack.dequantize_int4(packed, s).eq(0).all()
