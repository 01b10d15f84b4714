import pytest
import torch

from deepseek_moe.kernels import rms_norm
from deepseek_moe.kernels.switch import reference_paths
from deepseek_moe.model import norm as norm_module
from deepseek_moe.model.norm import RMSNorm
from tests.unit.quant_kernel_paths import served_calls


def test_rmsnorm_matches_formula() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rmsnorm_keeps_dtype() -> None:
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert RMSNorm(8).to(torch.bfloat16)(x).dtype == torch.bfloat16


def test_fp32_takes_the_fused_op_and_gives_the_formulas_bits() -> None:
    """fp32 norms call torch's fused rms_norm (one op instead of eight: decode pays per op); it must give the
    float32 formula's exact bits, forward and backward, so that switching paths changes no greedy output."""
    torch.manual_seed(1)
    for dim in (1, 33, 100, 1024, 5120):
        norm = RMSNorm(dim)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        x = (torch.randn(3, 4, dim) * 3).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        w_ref = norm.weight.detach().clone().requires_grad_()
        out = norm(x)
        ref = w_ref * (x_ref * torch.rsqrt(x_ref.pow(2).mean(-1, keepdim=True) + norm.eps))
        assert torch.equal(out, ref), dim
        g = torch.randn_like(out)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-5)


def test_a_few_rows_take_the_kernel_and_match_the_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """At inference, up to MAX_ROWS fp32 rows (a decode step's) are normalised by one C++ call
    (kernels/rms_norm.cpp): the formula's values up to the summation order's rounding, edge widths included;
    more rows, autograd or reference_paths() keep torch's op and its exact bits."""
    if not rms_norm.kernel_available():
        pytest.skip("no C++ compiler: the kernel cannot be built")
    served = served_calls(monkeypatch, norm_module, "rms_norm_rows")
    torch.manual_seed(2)
    for dim, eps in ((1, 1e-5), (7, 0.5), (33, 1e-5), (100, 1e-6), (1024, 1e-6), (5120, 1e-6)):
        norm = RMSNorm(dim, eps=eps)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        for shape in ((1, 1, dim), (2, 3, dim), (rms_norm.MAX_ROWS, dim)):
            x = torch.randn(shape) * 3
            formula = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
            served.clear()
            with torch.inference_mode():
                y = norm(x)
            assert served == [True], (dim, shape)
            torch.testing.assert_close(y, formula, rtol=2e-6, atol=1e-6)
    norm = RMSNorm(64)
    x = torch.randn(rms_norm.MAX_ROWS + 1, 64)
    with torch.inference_mode():
        for case in (x, x[:4]):
            served.clear()
            y = norm(case)
            assert served == [case.shape[0] <= rms_norm.MAX_ROWS]
            torch.testing.assert_close(y, case * torch.rsqrt(case.pow(2).mean(-1, keepdim=True) + norm.eps))
        with reference_paths():
            served.clear()
            norm(x[:2])
            assert served == [False]
    served.clear()
    norm(x[:2])  # autograd on: the weight needs its gradient
    assert served == [False]


def test_the_kernel_takes_strided_rows_and_propagates_inf_and_nan() -> None:
    if not rms_norm.kernel_available():
        pytest.skip("no C++ compiler: the kernel cannot be built")
    w = torch.rand(16) + 0.5
    x = torch.randn(4, 32)[:, ::2]  # rows 32 apart, columns 2 apart
    x[1, 3], x[2, 5] = float("inf"), float("nan")
    with torch.inference_mode():
        y = rms_norm.rms_norm_rows(x, w, 1e-6)
    formula = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert y is not None
    torch.testing.assert_close(y, formula, equal_nan=True)
    with pytest.raises(ValueError, match="weight"):
        with torch.inference_mode():
            rms_norm.rms_norm_rows(x, torch.ones(15), 1e-6)
