"""kernels/float_gemm.cpp (fp32 and bf16 weights, fp32 accumulation) against its PyTorch twin, on every
instruction set this CPU runs: odd sizes, the K-chunked path of many rows, strided weights, the fused experts
with empty experts and one expert holding every row, and the one-token experts call."""

from __future__ import annotations

import pytest
import torch

from deepseek_moe.kernels import cpu_build
from deepseek_moe.kernels import float_matmul as fm
from deepseek_moe.kernels.switch import fast_paths_enabled, reference_paths

pytestmark = pytest.mark.skipif(cpu_build.load_float_gemm_library() is None, reason="no C++ compiler: no kernel")


def _isas() -> list[str]:
    lib = cpu_build.load_float_gemm_library()
    best = lib.dsm_fgemm_best_isa() if lib is not None else 0
    return [isa for i, isa in enumerate(cpu_build.FLOAT_GEMM_ISAS) if i <= best]


@pytest.fixture(params=cpu_build.FLOAT_GEMM_ISAS)
def isa(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    if request.param not in _isas():
        pytest.skip(f"this CPU cannot run the {request.param} float_gemm path")
    lib = cpu_build.load_float_gemm_library()
    before = lib.dsm_fgemm_get_isa()
    fm.set_kernel_isa(request.param)
    yield request.param
    lib.dsm_fgemm_set_isa(before)


def _tol(K: int) -> float:
    return 1e-5 * max(K, 1) ** 0.5 * 4


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("M", "N", "K"), [(1, 1, 1), (1, 7, 13), (3, 5, 8), (4, 9, 31), (5, 33, 1030),
                                           (17, 6, 2049), (70, 11, 1100), (2, 0, 16), (0, 5, 16), (3, 4, 0)])
def test_matmul_matches_reference(isa: str, wdtype: torch.dtype, M: int, N: int, K: int) -> None:
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g).to(wdtype)
    with torch.no_grad():
        got = fm.float_matmul_kernel(x, w)
    assert got is not None and got.shape == (M, N) and got.dtype == torch.float32
    torch.testing.assert_close(got, fm.float_matmul_reference(x, w), atol=_tol(K), rtol=1e-5)


def test_matmul_bf16_activations_and_strided_weight(isa: str) -> None:
    g = torch.Generator().manual_seed(1)
    big = torch.randn(40, 300, generator=g).bfloat16()
    w = big[3:33, 5:262]  # rows 300 elements apart, not K: the kernel takes the row stride
    x = torch.randn(2, 6, 257, generator=g).bfloat16()
    with torch.no_grad():
        got = fm.float_matmul_kernel(x, w)
    assert got is not None and got.shape == (2, 6, 30) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), fm.float_matmul_reference(x, w).float(), atol=2e-2, rtol=1e-2)


def test_matmul_declines_under_autograd_and_in_reference_paths() -> None:
    x, w = torch.randn(2, 8, requires_grad=True), torch.randn(3, 8)
    assert fm.float_matmul_kernel(x, w) is None  # autograd: the caller's ordinary matmul keeps the graph
    assert fm.float_matmul(x, w).requires_grad
    with torch.no_grad(), reference_paths():
        assert not fast_paths_enabled()
        assert fm.float_matmul_kernel(x, w) is None
    assert fast_paths_enabled()
    with torch.no_grad():
        assert fm.float_matmul_kernel(x, w.half()) is None  # fp16 weights: not a kernel dtype


def test_matmul_shape_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"x \(2, 8\) and w \(3, 7\)"):
        fm.float_matmul_kernel(torch.randn(2, 8), torch.randn(3, 7))
    with pytest.raises(ValueError, match="unknown float_gemm instruction set"):
        fm.set_kernel_isa("avx9")


def _experts(E: int, F: int, D: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(*s, generator=g) * 0.3).to(dtype) for s in ((E, F, D), (E, D, F), (E, F, D)))


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[3, 0, 1, 7, 0], [0, 0, 11, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
@pytest.mark.parametrize("gated", [True, False])
def test_experts_match_reference(isa: str, wdtype: torch.dtype, counts: list[int], gated: bool) -> None:
    E, F, D = 5, 13, 21
    w1, w2, w3 = _experts(E, F, D, wdtype, sum(counts))
    A = sum(counts)
    x = torch.randn(A, D, generator=torch.Generator().manual_seed(7))
    gates = torch.rand(A, generator=torch.Generator().manual_seed(8)) if gated else None
    c = torch.tensor(counts)
    with torch.no_grad():
        got = fm.float_experts_kernel(x, c, gates, w1, w2, w3)
    assert got is not None and got.shape == (A, D)
    torch.testing.assert_close(got, fm.float_experts_reference(x, c, gates, w1, w2, w3), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_one_token_matches_reference(isa: str, wdtype: torch.dtype) -> None:
    w1, w2, w3 = _experts(9, 12, 20, wdtype, 3)
    x = torch.randn(1, 20, generator=torch.Generator().manual_seed(4))
    experts, gates = torch.tensor([4, 0, 8, 2]), torch.tensor([0.4, 0.3, 0.2, 0.1])
    with torch.no_grad():
        got = fm.float_experts_one_token(x, experts, gates, w1, w2, w3)
    want = fm.float_experts_one_token_reference(x, experts, gates, w1, w2, w3)
    assert got is not None
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Row k is expert experts[k] alone, computed by hand from the matrices.
    e, h = 8, x.float()
    row = ((torch.nn.functional.silu(h @ w1[e].float().t()) * (h @ w3[e].float().t())) * 0.2) @ w2[e].float().t()
    torch.testing.assert_close(got[2:3], row, atol=1e-4, rtol=1e-4)


def test_experts_errors_name_the_argument() -> None:
    w1, w2, w3 = _experts(3, 4, 6, torch.float32, 0)
    with pytest.raises(ValueError, match="counts sum to 3, x has 2 rows"):
        fm.float_experts_kernel(torch.randn(2, 6), torch.tensor([1, 2, 0]), None, w1, w2, w3)
    with pytest.raises(ValueError, match=r"w2 has shape \(3, 4, 6\)"):
        fm.float_experts_kernel(torch.randn(2, 6), torch.tensor([1, 1, 0]), None, w1, w1, w3)
    with pytest.raises(ValueError, match="gates has shape"):
        fm.float_experts_kernel(torch.randn(2, 6), torch.tensor([1, 1, 0]), torch.ones(3), w1, w2, w3)
