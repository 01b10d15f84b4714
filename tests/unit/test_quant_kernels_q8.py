"""The int8-activation kernel paths (activations quantised per block of 32, integer dot products) against their
plain-PyTorch twin (quantize_activations + quant_matmul_q8_reference), on every instruction set this CPU runs;
the paths it cannot run (AVX512-VNNI on an AVX2 machine) skip with the reason."""

from __future__ import annotations

import collections.abc
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quant_kernel_paths import fused_experts_case, kernel_path, kernel_weights, stacked_kernel_weights

from deepseek_moe.kernels import cpu_build, mla_decode, rms_norm
from deepseek_moe.kernels import quant_matmul as qm
from deepseek_moe.kernels.cpu_build import load_library

needs_kernel = pytest.mark.skipif(load_library() is None, reason="no C++ compiler: the kernel cannot be built")


@pytest.fixture(params=list(cpu_build.ISAS))
def isa(request: pytest.FixtureRequest) -> collections.abc.Iterator[str]:
    """Each kernel path in turn with int8 activations, skipped (with the reason) where this CPU cannot run it."""
    with kernel_path(request.param, "int8", " (its build is checked by objdump in test_quant_kernels)") as name:
        yield name


_weights = kernel_weights
_stacked = stacked_kernel_weights


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """The integer sums are exact in both; only the order of the per-block float32 sums differs."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max().clamp_min(1)))


@needs_kernel
@pytest.mark.parametrize("K", [1, 31, 32, 33, 100, 2048])
def test_kernel_quantises_activations_to_exactly_the_twins_codes(K: int) -> None:
    """Codes and scales equal, not close: ties at .5 (round half to even), an all-zero block, a block whose
    maximum is negative, magnitudes from 1e-30 to 1e30, a partial last block (zero-padded)."""
    torch.manual_seed(K)
    x = torch.randn(6, K) * torch.logspace(-30, 30, 6)[:, None]
    x[0, : min(K, 32)] = 0.0
    x[1] = -torch.arange(K, dtype=torch.float32) - 1  # maximum |x| is a negative value
    x[2] = (torch.arange(K) % 7 - 3) * 127.0 / 6  # many products land on .5 exactly
    q, d = qm.quantize_activations(x)
    nb = -(-K // 32)
    assert q.shape == (6, nb * 32) and d.shape == (6, nb)
    lib = load_library()
    qk, dk = torch.full_like(q, 99), torch.full_like(d, -1)
    lib.dsm_quantize_rows(x.data_ptr(), K, 6, K, qk.data_ptr(), dk.data_ptr(), 2)
    assert torch.equal(qk, q) and torch.equal(dk, d)
    # and the twin is what its docstring says: codes * scale reproduce x to half a step
    back = (q.view(6, nb, 32).float() * d[..., None]).view(6, -1)[:, :K]
    assert bool(((back - x).abs() <= d.repeat_interleave(32, 1)[:, :K] * 0.501).all())
    assert int(q.abs().max()) <= 127 and bool((q[:, K:] == 0).all())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9, 130])  # 130: three chunks of rows
@pytest.mark.parametrize(("N", "K", "group"), [(96, 256, 32), (70, 96, 32), (33, 384, 128), (16, 128, 64)])
def test_kernel_matches_twin(isa: str, bits: int, M: int, N: int, K: int, group: int) -> None:
    torch.manual_seed(M * 1000 + N)
    q, s = _weights(bits, N, K, group)
    x = torch.randn(M, K)
    got = qm.quant_matmul(x, q, s)
    assert qm.kernel_isa() == isa and qm.activations() == "int8"
    _close(got, qm.quant_matmul_q8_reference(x, q, s))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bits=st.sampled_from([8, 4]), M=st.integers(1, 70), N=st.integers(1, 23), groups=st.integers(1, 4),
       group=st.sampled_from([32, 64, 128]), k8=st.integers(1, 300), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_random_shapes_match_twin(isa: str, bits: int, M: int, N: int, groups: int, group: int, k8: int,
                                  seed: int, scale: float) -> None:
    torch.manual_seed(seed)
    K = k8 if bits == 8 else groups * group
    q, s = _weights(bits, N, K, group)
    x = torch.randn(M, K) * scale
    _close(qm.quant_matmul(x, q, s), qm.quant_matmul_q8_reference(x, q, s))


@pytest.mark.parametrize("M", [1, 5])
def test_int8_code_minus_128_keeps_its_sign(isa: str, M: int) -> None:
    """Our quantiser writes codes in [-127, 127], but a checkpoint written elsewhere may hold -128, whose negation
    does not fit a signed byte: the sign trick must take the weight's absolute value, not negate it. Against the
    twin and against the plain fp32 product of the dequantised weight (the same codes, no activation rounding
    beyond 1%)."""
    torch.manual_seed(M)
    q, s = _weights(8, 24, 96, 32)
    q[::2, ::3] = -128
    x = torch.randn(M, 96)
    x[0, :32] = -x[0, :32].abs()  # negative activations against -128: the case the trick got wrong
    got = qm.quant_matmul(x, q, s)
    _close(got, qm.quant_matmul_q8_reference(x, q, s))
    exact = qm.quant_matmul_reference(x, q, s)
    assert float((got - exact).norm() / exact.norm()) < 0.02


@pytest.mark.parametrize("bits", [8, 4])
def test_nan_in_a_block_reaches_every_output_of_its_row(isa: str, bits: int) -> None:
    """A NaN activation makes its row's outputs NaN, as in the float product (the quantiser's max ignored it and
    its code was undefined); the other rows stay finite and equal to the twin."""
    torch.manual_seed(7)
    q, s = _weights(bits, 16, 128, 32)
    x = torch.randn(3, 128)
    x[1, 40] = float("nan")
    got = qm.quant_matmul(x, q, s)
    assert bool(got[1].isnan().all()) and bool(got[[0, 2]].isfinite().all())
    want = qm.quant_matmul_q8_reference(x, q, s)
    assert bool(want[1].isnan().all())
    _close(got[[0, 2]], want[[0, 2]])


def test_twin_stays_near_the_fp32_product(isa: str) -> None:
    """Independent of the twin: on unit-normal activations, quantising them per block of 32 costs well under 2%
    relative error against the fp32-activation product (the step is max|x| / 127 per block)."""
    torch.manual_seed(3)
    for bits in (8, 4):
        q, s = _weights(bits, 64, 512, 32)
        x = torch.randn(8, 512)
        exact = qm.quant_matmul_reference(x, q, s)
        err = float((qm.quant_matmul(x, q, s) - exact).norm() / exact.norm())
        assert 1e-4 < err < 0.02, err  # > 0: the activations really were quantised


@pytest.mark.parametrize(("bits13", "bits2"), [(8, 8), (4, 4), (4, 8)])
@pytest.mark.parametrize("with_gates", [True, False])
def test_fused_experts_match_twin(isa: str, bits13: int, bits2: int, with_gates: bool) -> None:
    x, counts, gates, w, group = fused_experts_case(bits13, bits2, with_gates)
    got = qm.quant_experts(x, counts, gates, w, group)
    assert got is not None
    # h is quantised too; the kernel's h differs from the twin's in the last bits, which can move a code by one
    _close(got, qm.experts_reference(x, counts, gates, w, "int8"), rtol=2e-3)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(E=st.integers(1, 5), data=st.data(), D=st.sampled_from([32, 64, 96]), F_=st.sampled_from([32, 45, 64]),
       bits=st.sampled_from([8, 4]), seed=st.integers(0, 2**16))
def test_fused_experts_random_routing(isa: str, E: int, data: st.DataObject, D: int, F_: int, bits: int,
                                      seed: int) -> None:
    """Any split of 1-70 rows over the experts: empty experts, one expert taking every row, chunks of 64."""
    counts = data.draw(st.lists(st.integers(0, 70), min_size=E, max_size=E).filter(lambda c: 1 <= sum(c) <= 70))
    torch.manual_seed(seed)
    b2 = bits if F_ % 32 == 0 else 8  # int4 needs the input width to be a multiple of the group
    w = {"w1": _stacked(bits, E, F_, D, 32), "w3": _stacked(bits, E, F_, D, 32), "w2": _stacked(b2, E, D, F_, 32)}
    x = torch.randn(sum(counts), D)
    got = qm.quant_experts(x, torch.tensor(counts), None, w, 32)
    assert got is not None
    want = qm.experts_reference(x, torch.tensor(counts), None, w, "int8")
    # The kernel's h differs from the twin's in the last bits, which can move an h code by one where h sits on a
    # rounding boundary: an output then moves by that block's scale (max |h| / 127) times a w2 weight, which the
    # relative tolerance does not always cover (a 2-expert case here moved one element by 3.5 against 2.4).
    step = 0.0
    for e, (start, n) in enumerate(zip(itertools.accumulate(counts, initial=0), counts, strict=False)):
        if n:
            rows = x[start:start + n]
            h = (torch.nn.functional.silu(qm.quant_matmul_q8_reference(rows, *(t[e] for t in w["w1"])))
                 * qm.quant_matmul_q8_reference(rows, *(t[e] for t in w["w3"])))
            w2 = qm.quant_matmul_reference(torch.eye(F_), *(t[e] for t in w["w2"]))  # (F, D): W2^T dequantised
            step = max(step, float(h.abs().max()) / 127 * float(w2.abs().max()))
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max().clamp_min(1)) + 2 * step)


@needs_kernel
def test_vnni_and_avx2_agree_bit_for_bit() -> None:
    """Same float instructions on the same exact integer sums: the outputs are equal, not close."""
    if "avx512vnni" not in qm.supported_isas():
        pytest.skip("this CPU has no AVX512-VNNI: the vpdpbusd path cannot run here")
    torch.manual_seed(0)
    before = qm.kernel_isa()
    assert before is not None
    qm.set_activations("int8")
    try:
        for bits, group in ((8, 32), (4, 32), (4, 128)):
            q, s = _weights(bits, 45, 256, group)
            x = torch.randn(5, 256)
            out = {}
            for name in ("avx2", "avx512vnni"):
                qm.set_kernel_isa(name)
                out[name] = qm.quant_matmul(x, q, s)
            assert torch.equal(out["avx2"], out["avx512vnni"])
    finally:
        qm.set_kernel_isa(before)
        qm.set_activations(None)


def test_activation_mode_is_chosen_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    qm.set_activations(None)
    monkeypatch.setenv("DEEPSEEK_MOE_QUANT_ACTIVATIONS", "FP32")
    assert qm.activations() == "fp32"
    monkeypatch.setenv("DEEPSEEK_MOE_QUANT_ACTIVATIONS", "int16")
    with pytest.raises(ValueError, match="DEEPSEEK_MOE_QUANT_ACTIVATIONS=int16: expected one of int8, fp32"):
        qm.activations()
    monkeypatch.delenv("DEEPSEEK_MOE_QUANT_ACTIVATIONS")
    assert qm.activations() == qm.DEFAULT_ACTIVATIONS
    with pytest.raises(ValueError, match=r"activations \('bf16'\) must be one of int8, fp32"):
        qm.set_activations("bf16")


def test_info_reports_the_integer_path(isa: str, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from deepseek_moe.cli.main import main

    assert main(["info", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["cpu_kernels"]
    assert report == {"quant_matmul": isa, "activations": "int8", "int8_dot": qm.INT8_DOT[isa],
                      "supported": qm.supported_isas(), "mla_decode": mla_decode.kernel_available(),
                      "rms_norm": rms_norm.kernel_available()}
    assert main(["info", "tiny"]) == 0
    assert f"quantised matmul: {isa}, int8 activations, {qm.INT8_DOT[isa]} dot products" in capsys.readouterr().out
