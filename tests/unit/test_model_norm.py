import torch

from deepseek_moe.model.norm import RMSNorm


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
