"""The compiled quantised matmul against its readable twin (dequantise, then matmul), on random inputs."""

from __future__ import annotations

import pytest
import torch

from deepseek_moe.kernels import quant_matmul as qm
from deepseek_moe.kernels.cpu_build import load_library
from deepseek_moe.quant import pack

needs_kernel = pytest.mark.skipif(load_library() is None, reason="no C++ compiler: the kernel cannot be built")


def _weights(bits: int, N: int, K: int, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(N, K)
    if bits == 8:
        return pack.quantize_int8(w)
    packed, s = pack.quantize_int4(w, group)
    return pack.repack_int4_for_kernel(packed, group), s


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9, 16, 130])  # 130: three chunks of rows
@pytest.mark.parametrize(("N", "K", "group"), [(96, 256, 32), (70, 96, 32), (33, 384, 128), (16, 64, 64)])
def test_kernel_matches_reference(bits: int, M: int, N: int, K: int, group: int) -> None:
    torch.manual_seed(M * 1000 + N)
    q, s = _weights(bits, N, K, group)
    x = torch.randn(M, K)
    want = qm.quant_matmul_reference(x, q, s)
    got = qm.quant_matmul(x, q, s)
    assert M <= qm.KERNEL_MAX_ROWS  # so the kernel, not the tiled path, ran
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_kernel_handles_widths_not_multiple_of_the_vector(bits: int = 8) -> None:
    torch.manual_seed(0)
    q, s = _weights(8, 7, 45)  # 45 = one 32-wide step + a 13-column tail
    x = torch.randn(2, 45)
    torch.testing.assert_close(qm.quant_matmul(x, q, s), qm.quant_matmul_reference(x, q, s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_tiled_path_matches_reference_across_tiles(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qm, "TILE_ROWS", 16)
    torch.manual_seed(1)
    q, s = _weights(bits, 40, 64)
    x = torch.randn(3, 20, 64)
    torch.testing.assert_close(qm.quant_matmul_tiled(x, q, s), qm.quant_matmul_reference(x, q, s))


def test_bf16_activations_come_back_bf16() -> None:
    q, s = _weights(8, 8, 64)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    y = qm.quant_matmul(x, q, s)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), qm.quant_matmul_reference(x.float(), q, s), rtol=1e-2, atol=1e-2)


def test_width_mismatch_is_a_clear_error() -> None:
    q, s = _weights(8, 8, 64)
    with pytest.raises(ValueError, match="input width 32 does not match"):
        qm.quant_matmul(torch.randn(1, 32), q, s)


def _stacked(bits: int, E: int, N: int, K: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [_weights(bits, N, K, group) for _ in range(E)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@needs_kernel
@pytest.mark.parametrize(("bits13", "bits2"), [(8, 8), (4, 4), (4, 8)])
@pytest.mark.parametrize("with_gates", [True, False])
def test_fused_experts_match_reference(bits13: int, bits2: int, with_gates: bool) -> None:
    torch.manual_seed(bits13 + bits2)
    E, D, F_, group = 6, 64, 96, 32
    w = {"w1": _stacked(bits13, E, F_, D, group), "w3": _stacked(bits13, E, F_, D, group),
         "w2": _stacked(bits2, E, D, F_, group)}
    counts = torch.tensor([2, 0, 5, 1, 0, 3])  # experts 1 and 4 receive nothing
    x = torch.randn(int(counts.sum()), D)
    gates = torch.rand(x.shape[0]) if with_gates else None
    got = qm.quant_experts(x, counts, gates, w, group)
    assert got is not None
    torch.testing.assert_close(got, qm.experts_reference(x, counts, gates, w), rtol=1e-4, atol=1e-3)


@needs_kernel
def test_fused_experts_with_groups_larger_than_a_row_chunk() -> None:
    torch.manual_seed(5)
    w = {"w1": _stacked(4, 2, 64, 64, 32), "w3": _stacked(4, 2, 64, 64, 32), "w2": _stacked(8, 2, 64, 64, 32)}
    counts = torch.tensor([70, 3])  # 70 rows: two chunks of the kernel's 64
    x = torch.randn(73, 64)
    got = qm.quant_experts(x, counts, None, w, 32)
    assert got is not None
    torch.testing.assert_close(got, qm.experts_reference(x, counts, None, w), rtol=1e-4, atol=1e-3)
