"""Shared by the kernel tests: run one kernel path with one kind of activations, make weights in the kernel's
layout, and build a kernel library with flags of the test's own."""

from __future__ import annotations

import collections.abc
import contextlib
import ctypes
import shutil
from pathlib import Path

import pytest
import torch

from deepseek_moe.kernels import cpu_build
from deepseek_moe.kernels import quant_matmul as qm
from deepseek_moe.kernels.cpu_build import load_library
from deepseek_moe.quant import pack


@contextlib.contextmanager
def kernel_path(name: str, activations: str, why_unsupported: str = "") -> collections.abc.Iterator[str]:
    """Kernel path ``name`` with ``activations`` ("fp32" or "int8") for the body, skipped (with the reason) where
    this CPU cannot run it; the previous path and activations are restored afterwards."""
    if load_library() is None:
        pytest.skip("no C++ compiler: the kernel cannot be built")
    if name not in qm.supported_isas():
        pytest.skip(f"this CPU cannot run the {name} path{why_unsupported}")
    before = qm.kernel_isa()
    qm.set_kernel_isa(name)
    qm.set_activations(activations)
    yield name
    assert before is not None
    qm.set_kernel_isa(before)
    qm.set_activations(None)


def kernel_weights(bits: int, N: int, K: int, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (N, K) weights quantised to ``bits`` (int4 in groups of ``group``), in the kernel's layout."""
    w = torch.randn(N, K)
    if bits == 8:
        return pack.quantize_int8(w)
    packed, s = pack.quantize_int4(w, group)
    return pack.repack_int4_for_kernel(packed, group), s


def stacked_kernel_weights(bits: int, E: int, N: int, K: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E experts' random (N, K) weights from :func:`kernel_weights`, stacked: codes (E, ...) and scales (E, ...)."""
    pairs = [kernel_weights(bits, N, K, group) for _ in range(E)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def fused_experts_case(bits13: int, bits2: int, with_gates: bool) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """The fused-experts case both activation kinds are tested on: 6 experts (D 64, F 96, groups of 32), two of
    which receive no rows; w1/w3 in ``bits13``, w2 in ``bits2``. Returns x, counts, gates (or None), w, group."""
    torch.manual_seed(bits13 + bits2)
    E, D, F_, group = 6, 64, 96, 32
    w = {"w1": stacked_kernel_weights(bits13, E, F_, D, group), "w3": stacked_kernel_weights(bits13, E, F_, D, group),
         "w2": stacked_kernel_weights(bits2, E, D, F_, group)}
    counts = torch.tensor([2, 0, 5, 1, 0, 3])  # experts 1 and 4 receive nothing
    x = torch.randn(int(counts.sum()), D)
    gates = torch.rand(x.shape[0]) if with_gates else None
    return x, counts, gates, w, group


def build_with(source: Path, flags: tuple[str, ...], tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> ctypes.CDLL | None:
    """``source`` built with ``flags`` by g++ into a fresh cache under ``tmp_path`` (DEEPSEEK_MOE_KERNELS=0
    ignored: these tests build on purpose), loaded; None where the build fails."""
    monkeypatch.setenv("DEEPSEEK_MOE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("g++") or "g++")
    monkeypatch.delenv("DEEPSEEK_MOE_KERNELS", raising=False)
    return cpu_build.build_library(source, flags, "test")


def served_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[bool]:
    """Wrap ``owner.name`` (a fast path that returns None where it declines) for the test: the list it returns
    grows by one entry a call, True where the call served."""
    served: list[bool] = []
    real = getattr(owner, name)

    def counted(*args: object, **kwargs: object) -> object:
        out = real(*args, **kwargs)
        served.append(out is not None)
        return out

    monkeypatch.setattr(owner, name, counted)
    return served


def assert_call_matches(run: collections.abc.Callable[[], torch.Tensor],
                        call_off: collections.abc.Callable[[], torch.Tensor], calls: list[bool], n_calls: int,
                        isa: str, activations: str) -> None:
    """A fused call's test on one kernel path: ``run()`` (logits of some steps) takes the call ``n_calls`` times
    (``calls``: served_calls' list), equals ``call_off()`` (the same steps with the call off: the same kernels,
    so to rounding) and, with fp32 activations, the plain PyTorch of ``reference_paths()`` (int8 activations
    round x, which the dequantised reference does not)."""
    from deepseek_moe.kernels.switch import reference_paths

    with kernel_path(isa, activations), torch.inference_mode():
        got = run()
        assert calls == [True] * n_calls, calls
        plain = call_off()
        with reference_paths():
            ref = run()
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    if activations == "fp32":
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
