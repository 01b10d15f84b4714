"""The compiled quantised matmul against its readable twin (dequantise, then matmul), on random inputs, on every
instruction-set path this CPU can run, for builds at the baseline and the x86-64-v3 -march."""

from __future__ import annotations

import collections.abc
import contextlib
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quant_kernel_paths import (
    build_with,
    fused_experts_case,
    kernel_path,
    kernel_weights,
    stacked_kernel_weights,
)

from deepseek_moe.kernels import cpu_build, mla_decode, rms_norm
from deepseek_moe.kernels import quant_matmul as qm
from deepseek_moe.kernels.cpu_build import load_library

needs_kernel = pytest.mark.skipif(load_library() is None, reason="no C++ compiler: the kernel cannot be built")
ALL_ISAS = list(cpu_build.ISAS)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


# What each path needs, by /proc/cpuinfo's names: the test's own account, independent of the kernel's CPUID code.
AVX512 = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
NEEDS = {"scalar": set(), "avx2": {"avx2", "fma", "f16c"}, "avx512": AVX512, "avx512vnni": AVX512 | {"avx512_vnni"}}
X86 = platform.machine() in ("x86_64", "AMD64")


@pytest.fixture(params=ALL_ISAS)
def isa(request: pytest.FixtureRequest) -> collections.abc.Iterator[str]:
    """Each kernel path in turn with fp32 activations (the int8-activation paths: test_quant_kernels_q8.py),
    skipped (with the reason) where this CPU cannot run it; restored afterwards."""
    with kernel_path(request.param, "fp32") as name:
        yield name


_weights = kernel_weights
_stacked = stacked_kernel_weights


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9, 16, 130])  # 130: three chunks of rows
@pytest.mark.parametrize(("N", "K", "group"), [(96, 256, 32), (70, 96, 32), (33, 384, 128), (16, 64, 64)])
def test_kernel_matches_reference(isa: str, bits: int, M: int, N: int, K: int, group: int) -> None:
    torch.manual_seed(M * 1000 + N)
    q, s = _weights(bits, N, K, group)
    x = torch.randn(M, K)
    want = qm.quant_matmul_reference(x, q, s)
    got = qm.quant_matmul(x, q, s)
    assert M <= qm.KERNEL_MAX_ROWS and qm.kernel_isa() == isa  # so this path of the kernel, not the tiled one, ran
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M", [1, 2])  # a row alone (decode: the rows of W one after another) and a tile of rows
@pytest.mark.parametrize("K", [45, 7, 23])  # a vector step + a 13-column tail; shorter than any vector
def test_kernel_handles_widths_not_multiple_of_the_vector(isa: str, K: int, M: int) -> None:
    torch.manual_seed(K)
    q, s = _weights(8, 7, K)
    x = torch.randn(M, K)
    torch.testing.assert_close(qm.quant_matmul(x, q, s), qm.quant_matmul_reference(x, q, s), rtol=1e-5, atol=1e-5)


@contextlib.contextmanager
def strip_rows(rows: int | None) -> collections.abc.Iterator[int]:
    """The kernel's strip path from ``rows`` rows of x on (None: the default threshold) for the body; yields it."""
    before = qm.set_strip_rows(rows if rows is not None else 1)
    try:
        if rows is None:
            qm.set_strip_rows(before)
        yield qm.strip_rows() or 0
    finally:
        qm.set_strip_rows(before)


@pytest.mark.parametrize("M", ["threshold - 1", "threshold", 48, 130])
@pytest.mark.parametrize(("bits", "N", "K", "group"), [(8, 48, 256, 32), (8, 70, 45, 32), (8, 37, 200, 32),
                                                       (8, 16, 1416, 32), (4, 48, 256, 32), (4, 70, 96, 32),
                                                       (4, 37, 384, 128), (4, 16, 1408, 64)])
def test_strip_path_matches_reference_across_its_threshold(isa: str, M: int | str, bits: int, N: int, K: int,
                                                          group: int) -> None:
    """From the threshold on, products with fp32 activations take the strip path (16 rows of W widened into a
    panel, 6 x 16 tiles over the rows of x): rows just below and at it, several tiles with a short last one, N not
    a multiple of the 16-row panel, int8 K not a multiple of the 8-column widening step, int4 groups of 32-128."""
    with strip_rows(None) as threshold:
        rows = {"threshold - 1": threshold - 1, "threshold": threshold}.get(str(M), M)
        assert isinstance(rows, int) and 1 < threshold <= 48
        torch.manual_seed(rows * 1000 + N + K)
        q, s = _weights(bits, N, K, group)
        x = torch.randn(rows, K)
        torch.testing.assert_close(qm.quant_matmul(x, q, s), qm.quant_matmul_reference(x, q, s), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 2, 5, 7, 8, 13])
def test_strip_path_serves_any_row_count_when_forced(isa: str, bits: int, M: int) -> None:
    """Every tile height (1 to 6 rows) and the split of a few rows into near-equal tiles, on the strip path."""
    with strip_rows(1):
        torch.manual_seed(M)
        K = 77 if bits == 8 else 96
        q, s = _weights(bits, 37, K, 32)
        x = torch.randn(M, K)
        torch.testing.assert_close(qm.quant_matmul(x, q, s), qm.quant_matmul_reference(x, q, s), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", ["strip", "decode"])
def test_int8_kernel_reads_and_writes_rows_at_their_strides(isa: str, path: str) -> None:
    """x rows ldx > K apart (the columns between hold NaN: reading them would show) and y rows ldy > N apart (the
    columns between must keep their value), on both paths."""
    lib = load_library()
    M, N, K, pad = 13, 37, 45, 7
    torch.manual_seed(3)
    q, s = _weights(8, N, K)
    x_wide = torch.full((M, K + pad), float("nan"))
    x_wide[:, :K] = torch.randn(M, K)
    y_wide = torch.full((M, N + pad), 7.0)
    with strip_rows(1 if path == "strip" else 1 << 40):
        lib.dsm_qgemm_int8(x_wide.data_ptr(), K + pad, M, K, q.data_ptr(), s.data_ptr(), N, y_wide.data_ptr(),
                           N + pad, 2)
    want = qm.quant_matmul_reference(x_wide[:, :K].contiguous(), q, s)
    torch.testing.assert_close(y_wide[:, :N], want, rtol=1e-5, atol=1e-4)
    assert (y_wide[:, N:] == 7.0).all()


@pytest.mark.parametrize("rows", [None, 1, 1 << 40])  # the default threshold, the strip path only, decode only
def test_grouped_int8_matches_one_reference_product_per_expert(isa: str, rows: int | None) -> None:
    """One kernel call for every expert of a layer equals each expert's rows times its own dequantised weight:
    experts with no rows, with fewer and more rows than the strip threshold, N not a multiple of 16."""
    torch.manual_seed(5)
    E, N, K = 6, 37, 45
    q, s = _stacked(8, E, N, K, 32)
    counts = [0, 3, 9, 50, 0, 14]
    x = torch.randn(sum(counts), K)
    want = torch.cat([qm.quant_matmul_reference(xe, q[e], s[e]) for e, xe in enumerate(x.split(counts))])
    with strip_rows(rows):
        torch.testing.assert_close(qm.quant_matmul_grouped(x, q, s, counts), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="counts .sum 76, 6 experts. do not fit x .75, 45."):
        qm.quant_matmul_grouped(x[1:], q, s, counts)


@needs_kernel
def test_cpuid_detection_agrees_with_proc_cpuinfo() -> None:
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    expected = [name for name in ALL_ISAS if NEEDS[name] <= flags and (name == "scalar" or X86)]
    assert qm.supported_isas() == expected
    best = qm.kernel_isa() if cpu_build.env.kernel_isa() is None else expected[-1]
    assert best == expected[-1]  # the best path runs unless DEEPSEEK_MOE_KERNEL_ISA forces another


@needs_kernel
def test_env_override_forces_a_path_and_a_bad_one_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    before = qm.kernel_isa()
    assert before is not None
    try:
        monkeypatch.setenv("DEEPSEEK_MOE_KERNEL_ISA", "scalar")
        cpu_build.load_library.cache_clear()
        assert qm.kernel_isa() == "scalar"
        for bad, why in (("sse9", "unknown kernel instruction set 'sse9'"),
                         *((name, f"this CPU cannot run the {name} kernels") for name in ALL_ISAS
                           if name not in qm.supported_isas())):
            monkeypatch.setenv("DEEPSEEK_MOE_KERNEL_ISA", bad)
            cpu_build.load_library.cache_clear()
            with pytest.raises(ValueError, match=f"DEEPSEEK_MOE_KERNEL_ISA={bad}: {why}"):
                load_library()
    finally:
        monkeypatch.delenv("DEEPSEEK_MOE_KERNEL_ISA")
        cpu_build.load_library.cache_clear()
        qm.set_kernel_isa(before)


def _check_paths_of(lib: object, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path of ``lib`` this CPU runs against the reference, with fp32 and int8 activations: int8 and int4,
    odd shapes, group sizes, the fused experts. Returns the paths checked."""
    monkeypatch.setattr(qm, "load_library", lambda: lib)
    torch.manual_seed(0)
    checked = []
    try:
        for name in qm.supported_isas():
            qm.set_kernel_isa(name)
            for acts in qm.ACTIVATIONS:
                qm.set_activations(acts)
                ref = qm.quant_matmul_q8_reference if acts == "int8" else qm.quant_matmul_reference
                for bits, M, N, K, group in [(8, 1, 37, 45, 32), (8, 6, 9, 200, 32), (8, 13, 37, 45, 32),
                                             (4, 1, 37, 96, 32), (4, 19, 37, 256, 64),
                                             (4, 5, 13, 256, 64), (4, 3, 6, 384, 128)]:
                    q, s = _weights(bits, N, K, group)
                    x = torch.randn(M, K)
                    torch.testing.assert_close(qm.quant_matmul(x, q, s), ref(x, q, s), rtol=1e-5, atol=1e-4,
                                               msg=lambda m, name=name, acts=acts: f"{name} {acts}: {m}")
                w = {"w1": _stacked(4, 3, 40, 64, 32), "w3": _stacked(4, 3, 40, 64, 32),
                     "w2": _stacked(8, 3, 64, 40, 32)}
                counts = torch.tensor([3, 0, 2])
                x = torch.randn(5, 64)
                got = qm.quant_experts(x, counts, None, w, 32)
                assert got is not None
                torch.testing.assert_close(got, qm.experts_reference(x, counts, None, w, acts), rtol=1e-3,
                                           atol=1e-3)
            checked.append(name)
    finally:
        qm.set_activations(None)
    return checked


V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "abm", "xsave"}  # x86-64-v3 (lzcnt is "abm")


@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])
def test_source_builds_for_each_march_and_every_path_it_can_run_matches(
        march: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one source compiles for the baseline ISA (its SIMD paths through target attributes, chosen at run time)
    and for x86-64-v3; in each build every path this CPU runs agrees with the reference."""
    if not X86 or shutil.which("g++") is None:
        pytest.skip("needs x86-64 and g++")
    if march == "x86-64-v3" and not V3 <= _cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(V3 - _cpu_flags())}: an x86-64-v3 build cannot run here")
    lib = build_with(cpu_build.SOURCE, (*cpu_build.FLAGS, f"-march={march}"), tmp_path, monkeypatch)
    if lib is None:
        pytest.skip(f"g++ cannot build for -march={march}")
    cpu_build.configure_qgemm(lib)
    restore = qm.kernel_isa()
    try:
        checked = _check_paths_of(lib, monkeypatch)
    finally:
        monkeypatch.undo()
        if restore is not None:
            qm.set_kernel_isa(restore)
    assert checked == [name for name in ALL_ISAS if NEEDS[name] <= _cpu_flags()]


def test_build_without_simd_paths_offers_only_scalar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """-DDSM_NO_SIMD compiles what a non-x86 CPU gets: the scalar path alone, which is chosen and correct, and
    asking for another is a clear error."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    lib = build_with(cpu_build.SOURCE, (*cpu_build.FLAGS, "-DDSM_NO_SIMD"), tmp_path, monkeypatch)
    assert lib is not None
    cpu_build.configure_qgemm(lib)
    assert cpu_build.supported_isas(lib) == ["scalar"] and cpu_build.ISAS[lib.dsm_get_isa()] == "scalar"
    with pytest.raises(ValueError, match="this CPU cannot run the avx2 kernels; it can run: scalar"):
        cpu_build.set_isa(lib, "avx2")
    restore = qm.kernel_isa()
    try:
        assert _check_paths_of(lib, monkeypatch) == ["scalar"]
    finally:
        monkeypatch.undo()
        if restore is not None:
            qm.set_kernel_isa(restore)


def test_baseline_build_keeps_vector_instructions_inside_their_paths(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """What no CPU here can show by running: in the -march=x86-64 build only the avx2 and avx512 paths hold
    VEX/EVEX instructions (AVX and later) and only the avx512 path touches zmm registers, so the scalar path and
    the shared code (dispatch, OpenMP loops) run on any x86-64 CPU. (Built for x86-64-v3, the scalar loops get
    VEX code and this check fails.)"""
    if not X86 or shutil.which("g++") is None or shutil.which("objdump") is None:
        pytest.skip("needs x86-64, g++ and objdump")
    flags = (*cpu_build.FLAGS, "-march=x86-64")
    assert build_with(cpu_build.SOURCE, flags, tmp_path, monkeypatch) is not None
    lib = cpu_build.library_path(cpu_build.SOURCE, flags, shutil.which("g++") or "g++")
    asm = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(lib)], check=True, capture_output=True,
                         text=True).stdout
    vex: set[str] = set()
    zmm: set[str] = set()
    function = ""
    for line in asm.splitlines():
        if line.endswith(">:"):
            function = line.split("<", 1)[1]
        elif len(parts := line.split("\t")) >= 2 and parts[1].startswith("v"):  # vmovups, vfmadd231ps, ...
            vex.add(function)
            if "zmm" in line:
                zmm.add(function)
    assert zmm and all("::avx512::" in f for f in zmm), sorted(zmm)
    assert all("::avx2::" in f or "::avx512::" in f for f in vex), sorted(vex)
    # The VNNI integer tiles are built (never run on an AVX2-only CPU) and vpdpbusd appears only in them.
    dots = {f for f in asm.split("\n\n") if "vpdpbusd" in f}
    assert dots and all("::avx512::vnni::tile_q8" in f.split(">:", 1)[0] for f in dots)
    assert any("::avx2::" in f for f in vex) and any("::scalar::" in f for f in asm.split(">:"))


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
    ref = qm.quant_matmul_q8_reference if qm.activations() == "int8" else qm.quant_matmul_reference
    torch.testing.assert_close(y.float(), ref(x.float(), q, s), rtol=1e-2, atol=1e-2)


def test_width_mismatch_is_a_clear_error() -> None:
    q, s = _weights(8, 8, 64)
    with pytest.raises(ValueError, match="input width 32 does not match"):
        qm.quant_matmul(torch.randn(1, 32), q, s)


@pytest.mark.parametrize(("bits13", "bits2"), [(8, 8), (4, 4), (4, 8)])
@pytest.mark.parametrize("with_gates", [True, False])
def test_fused_experts_match_reference(isa: str, bits13: int, bits2: int, with_gates: bool) -> None:
    x, counts, gates, w, group = fused_experts_case(bits13, bits2, with_gates)
    got = qm.quant_experts(x, counts, gates, w, group)
    assert got is not None
    torch.testing.assert_close(got, qm.experts_reference(x, counts, gates, w), rtol=1e-4, atol=1e-3)


def test_fused_experts_with_groups_larger_than_a_row_chunk(isa: str) -> None:
    torch.manual_seed(5)
    w = {"w1": _stacked(4, 2, 64, 64, 32), "w3": _stacked(4, 2, 64, 64, 32), "w2": _stacked(8, 2, 64, 64, 32)}
    counts = torch.tensor([70, 3])  # 70 rows: two chunks of the kernel's 64
    x = torch.randn(73, 64)
    got = qm.quant_experts(x, counts, None, w, 32)
    assert got is not None
    torch.testing.assert_close(got, qm.experts_reference(x, counts, None, w), rtol=1e-4, atol=1e-3)


def test_scale_of_the_wrong_dtype_is_refused_not_misread() -> None:
    x = torch.randn(1, 64)
    q, s = _weights(8, 8, 64)
    with pytest.raises(ValueError, match=r"quant_matmul: scale is torch.float16; int8 codes need torch.float32"):
        qm.quant_matmul(x, q, s.half())  # was read as float32 bits: a silently wrong answer
    q4, s4 = _weights(4, 8, 64)
    with pytest.raises(ValueError, match=r"quant_matmul: scale is torch.float32; int4 codes need torch.float16"):
        qm.quant_matmul(x, q4, s4.float())


@pytest.mark.parametrize(("case", "message"), [
    ("int8 scale per group", r"scale has shape \(8, 2\); int8 codes \(8, 64\) need \(8,\)"),
    ("int4 groups not dividing K", r"scale has shape \(8, 3\); int4 codes \(8, 32\) need \(8, G\)"),
    ("int4 scale rows", r"scale has shape \(4, 2\); int4 codes \(8, 32\) need \(8, G\)"),
    ("transposed codes", r"q is not contiguous \(shape \(8, 64\), strides \(1, 8\)\)"),
    ("transposed scale", r"scale is not contiguous"),
    ("float codes", r"q must be int8 codes \(N, K\) or uint8 int4 codes \(N, K/2\), got torch.float32"),
    ("integer input", r"x must be a floating-point tensor, got torch.int64"),
])
def test_malformed_weights_are_refused_naming_the_argument(case: str, message: str) -> None:
    x = torch.randn(2, 64)
    q8, s8 = _weights(8, 8, 64)
    q4, s4 = _weights(4, 8, 64)
    args = {
        "int8 scale per group": (x, q8, s8[:, None].expand(8, 2).contiguous()),
        "int4 groups not dividing K": (x, q4, torch.ones(8, 3, dtype=torch.float16)),
        "int4 scale rows": (x, q4, s4[:4].contiguous()),
        "transposed codes": (x, q8.t().contiguous().t(), s8),
        "transposed scale": (x, q4, s4.t().contiguous().t()),
        "float codes": (x, q8.float(), s8),
        "integer input": (torch.ones(2, 64, dtype=torch.int64), q8, s8),
    }[case]
    with pytest.raises(ValueError, match=message):
        qm.quant_matmul(*args)


def test_fused_experts_refuse_a_wrong_scale_dtype_naming_the_weight() -> None:
    w = {"w1": _stacked(8, 2, 16, 32, 32), "w3": _stacked(8, 2, 16, 32, 32), "w2": _stacked(8, 2, 32, 16, 32)}
    w["w2"] = (w["w2"][0], w["w2"][1].half())
    with pytest.raises(ValueError, match=r"quant_experts: w2: scale is torch.float16; int8 codes need torch.float32"):
        qm.quant_experts(torch.randn(3, 32), torch.tensor([1, 2]), None, w, 32)


def test_info_reports_the_path_that_runs(isa: str, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from deepseek_moe.cli.main import main

    assert main(["info", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["cpu_kernels"]
    assert report == {"quant_matmul": isa, "activations": "fp32", "int8_dot": None, "supported": qm.supported_isas(),
                      "mla_decode": mla_decode.kernel_available(),
                      "rms_norm": rms_norm.kernel_available()}
    assert main(["info", "tiny"]) == 0
    assert f"quantised matmul: {isa}, fp32 activations (this CPU runs: " in capsys.readouterr().out


@pytest.mark.parametrize(("case", "message"), [
    ("w3 int4 w1 int8", r"w1 \(torch.int8\) and w3 \(torch.uint8\) must share a format"),
    ("w2 too wide", r"w2 codes have shape \(2, 32, 24\), expected \(2, 32, 16\)"),
    ("counts", r"counts sum to 4, x has 3 rows"),
    ("gates", r"gates has shape \(2,\), expected \(3,\)"),
    ("group", r"w1 scales have shape \(2, 16, 1\), expected \(2, 16, 2\) \(group_size 16\)"),
])
def test_fused_experts_refuse_mismatched_arguments(case: str, message: str) -> None:
    w = {"w1": _stacked(8, 2, 16, 32, 32), "w3": _stacked(8, 2, 16, 32, 32), "w2": _stacked(8, 2, 32, 16, 32)}
    x, counts, gates, group = torch.randn(3, 32), torch.tensor([1, 2]), None, 32
    if case == "w3 int4 w1 int8":
        w["w3"] = _stacked(4, 2, 16, 32, 32)
    elif case == "w2 too wide":
        w["w2"] = _stacked(8, 2, 32, 24, 32)
    elif case == "counts":
        counts = torch.tensor([2, 2])
    elif case == "gates":
        gates = torch.rand(2)
    else:
        w["w1"], group = _stacked(4, 2, 16, 32, 32), 16
    with pytest.raises(ValueError, match=message):
        qm.quant_experts(x, counts, gates, w, group)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bits=st.sampled_from([8, 4]), M=st.integers(1, 70), N=st.integers(1, 23), groups=st.integers(1, 4),
       group=st.sampled_from([32, 64, 128]), k8=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_random_shapes_match_reference(isa: str, bits: int, M: int, N: int, groups: int, group: int, k8: int,
                                       seed: int) -> None:
    torch.manual_seed(seed)
    K = k8 if bits == 8 else groups * group
    q, s = _weights(bits, N, K, group)
    x = torch.randn(M, K)
    torch.testing.assert_close(qm.quant_matmul(x, q, s), qm.quant_matmul_reference(x, q, s), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("counts", [[0, 0, 9, 0], [9, 0, 0, 0], [0, 0, 0, 9], [0, 0, 0, 0]])
def test_fused_experts_with_one_expert_taking_every_row_or_none(isa: str, counts: list[int]) -> None:
    torch.manual_seed(sum(i * c for i, c in enumerate(counts)))
    w = {"w1": _stacked(4, 4, 40, 64, 32), "w3": _stacked(4, 4, 40, 64, 32), "w2": _stacked(8, 4, 64, 40, 32)}
    x = torch.randn(sum(counts), 64)
    got = qm.quant_experts(x, torch.tensor(counts), None, w, 32)
    assert got is not None and got.shape == (sum(counts), 64)
    torch.testing.assert_close(got, qm.experts_reference(x, torch.tensor(counts), None, w), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("path", ALL_ISAS)
@pytest.mark.parametrize("activations", ["fp32", "int8"])
@pytest.mark.parametrize(("bits13", "bits2"), [(8, 8), (4, 4), (4, 8)])
@pytest.mark.parametrize("experts", [[2, 0, 5, 3], [5, 5, 1]])  # distinct (a decode step), and one repeated
def test_one_token_equals_the_fused_experts_on_its_sorted_rows(path: str, activations: str, bits13: int, bits2: int,
                                                                experts: list[int]) -> None:
    """quant_experts_one_token (a decode step: the token read as K items, no sort) gives what quant_experts gives
    the token's row repeated K times and sorted by expert, row for row in the selection's order; and, with fp32
    activations, the fp32 reference's values."""
    _, _, _, w, group = fused_experts_case(bits13, bits2, True)
    D = w["w1"][0].shape[2] * (2 if bits13 == 4 else 1)
    torch.manual_seed(11)
    x = torch.randn(1, D)
    experts_K = torch.tensor(experts)
    gates_K = torch.rand(len(experts))
    order = torch.argsort(experts_K, stable=True)
    counts = torch.bincount(experts_K, minlength=w["w1"][0].shape[0])
    with kernel_path(path, activations):
        got = qm.quant_experts_one_token(x, experts_K, gates_K, w, group)
        sorted_rows = qm.quant_experts(x.expand(len(experts), -1), counts, gates_K[order], w, group)
    assert got is not None and sorted_rows is not None
    want = torch.empty_like(sorted_rows).index_copy_(0, order, sorted_rows)
    if activations == "int8":  # the same integer sums, each row's fp32 additions in the same order
        assert torch.equal(got, want)
    else:  # a row alone is summed in another order than rows sharing a tile (outputs ~10, fp32 rounding)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    if activations == "fp32":
        reference = qm.experts_reference(x.expand(len(experts), -1), counts, gates_K[order], w)
        torch.testing.assert_close(got, torch.empty_like(reference).index_copy_(0, order, reference),
                                   rtol=1e-4, atol=1e-3)


def test_one_token_refuses_an_expert_index_out_of_range() -> None:
    _, _, _, w, group = fused_experts_case(8, 8, False)
    with pytest.raises(ValueError, match=r"expert index 6 outside 0\.\.5"):
        qm.quant_experts_one_token(torch.randn(1, 64), torch.tensor([1, 6]), torch.rand(2), w, group)


def test_reference_paths_turn_the_quantised_kernels_off() -> None:
    """Inside ``reference_paths()`` the quantised products take their dequantise-and-multiply twins, as every
    other fast path does (a test comparing a model's fast and plain decoding relies on it): the fused experts
    decline, and a product equals the tiled reference exactly."""
    from deepseek_moe.kernels.switch import reference_paths

    if load_library() is None:
        pytest.skip("no C++ compiler: the kernel cannot be built")
    x, counts, gates, w, group = fused_experts_case(8, 8, True)
    q, s = _weights(8, 40, 64)
    xm = torch.randn(2, 64)
    assert qm.quant_experts(x, counts, gates, w, group) is not None
    with reference_paths():
        assert qm.quant_experts(x, counts, gates, w, group) is None
        assert qm.quant_experts_one_token(x[:1], torch.tensor([0, 2]), torch.rand(2), w, group) is None
        assert torch.equal(qm.quant_matmul(xm, q, s), qm.quant_matmul_tiled(xm, q, s))
