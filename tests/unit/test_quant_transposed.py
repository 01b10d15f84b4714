"""The backward's transposed product dx = dy @ dequant(W) (kernels/quant_transposed.py): qgemm.cpp's
dsm_qgrad_int8 on every instruction set this CPU runs equals the tiled dequantise-then-matmul twin, for one
weight and for the routed experts of a layer in one call (odd sizes, experts without rows), and the float64
product of the dequantised weight (an independent reference); reference_paths() and int4 codes take the twin."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from quant_kernel_paths import kernel_path, kernel_weights

from deepseek_moe.kernels import quant_transposed as qt
from deepseek_moe.kernels.quant_layout import dequantize
from deepseek_moe.kernels.switch import reference_paths

ISAS = ["scalar", "avx2", "avx512"]


def _float64(dy: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (dy.double() @ dequantize(q, s).double()).float()


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=25, deadline=None)
@given(M=st.integers(1, 70), N=st.integers(1, 97), K=st.integers(1, 150), seed=st.integers(0, 2**16))
def test_kernel_equals_the_tiled_twin_and_the_float64_product(isa: str, M: int, N: int, K: int, seed: int) -> None:
    with kernel_path(isa, "fp32"):
        torch.manual_seed(seed)
        q, s = kernel_weights(8, N, K)
        dy = torch.randn(M, N)
        dx = qt.input_grad(dy, q, s)
        ref = qt.input_grad_reference(dy, q, s)
        assert dx.shape == (M, K) and dx.dtype == torch.float32
        torch.testing.assert_close(dx, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, _float64(dy, q, s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=20, deadline=None)
@given(counts=st.lists(st.integers(0, 20), min_size=1, max_size=6), N=st.integers(1, 50),
       K=st.integers(1, 90), seed=st.integers(0, 2**16))
def test_grouped_kernel_equals_a_per_expert_loop(isa: str, counts: list[int], N: int, K: int, seed: int) -> None:
    with kernel_path(isa, "fp32"):
        torch.manual_seed(seed)
        ws = [kernel_weights(8, N, K) for _ in counts]
        q_E, s_E = torch.stack([q for q, _ in ws]), torch.stack([s for _, s in ws])
        dy = torch.randn(sum(counts), N)
        dx = qt.input_grad_grouped(dy, q_E, s_E, counts)
        ref = torch.cat([_float64(d, q_E[e], s_E[e]) for e, d in enumerate(dy.split(counts))])
        torch.testing.assert_close(dx, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, qt.input_grad_grouped_reference(dy, q_E, s_E, counts), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_over_several_calls_are_summed(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight of more than CHUNK_ROWS rows (a vocabulary's head) goes through the kernel a slice at a time."""
    monkeypatch.setattr(qt, "CHUNK_ROWS", 16)
    with kernel_path("avx2", "fp32"):
        torch.manual_seed(0)
        q, s = kernel_weights(8, 53, 40)  # three full slices and a short one
        dy = torch.randn(9, 53).to(dtype)
        dx = qt.input_grad(dy, q, s)
        assert dx.dtype == dtype
        want = _float64(dy.float(), q, s)
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
        torch.testing.assert_close(dx.float(), want, **tol)


def test_v2_lite_expert_shape_and_bf16_gradients() -> None:
    """A V2-Lite expert (1408 x 2048) with its rows across several panels; bf16 dy comes back bf16."""
    with kernel_path("avx2", "fp32"):
        torch.manual_seed(0)
        q, s = kernel_weights(8, 1408, 2048)
        dy = torch.randn(37, 1408)
        torch.testing.assert_close(qt.input_grad(dy, q, s), _float64(dy, q, s), rtol=1e-5, atol=1e-4)
        dx16 = qt.input_grad(dy.bfloat16(), q, s)
        assert dx16.dtype == torch.bfloat16
        torch.testing.assert_close(dx16.float(), _float64(dy.bfloat16().float(), q, s), rtol=1e-2, atol=1e-1)


def test_reference_paths_and_int4_take_the_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel must not run inside reference_paths() or for int4 codes: a library that fails if called
    proves it."""
    class Refuse:
        def __getattr__(self, name: str) -> None:
            raise AssertionError(f"kernel called: {name}")

    monkeypatch.setattr(qt, "load_library", lambda: Refuse())
    q, s = kernel_weights(8, 24, 40)
    dy = torch.randn(5, 24)
    with reference_paths():
        torch.testing.assert_close(qt.input_grad(dy, q, s), _float64(dy, q, s), rtol=1e-5, atol=1e-5)
    q4, s4 = kernel_weights(4, 24, 64)
    torch.testing.assert_close(qt.input_grad(dy, q4, s4), _float64(dy, q4, s4), rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError, match="kernel called"):
        qt.input_grad(dy, q, s)


def test_grouped_refuses_counts_that_do_not_fit() -> None:
    q, s = kernel_weights(8, 8, 16)
    q_E, s_E = torch.stack([q, q]), torch.stack([s, s])
    if qt.load_library() is None:
        pytest.skip("no C++ compiler: the twin does not check counts")
    with pytest.raises(ValueError, match="counts"):
        qt.input_grad_grouped(torch.randn(5, 8), q_E, s_E, [2, 2])
