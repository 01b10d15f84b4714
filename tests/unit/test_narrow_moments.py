"""NarrowMomentsAdamW (AdamW with bf16 moments, DeepSeek-V3 §3.3.3) against torch's AdamW whose moments are
rounded to bf16 after every step; its state, resume (alone and through the fine-tune Trainer), the config field,
the CLI flags and the β check."""

import copy
import dataclasses
import json
import math

import pytest
import torch
from test_finetune_run import _check_resumes_exactly, base, config  # noqa: F401 (base: a fixture)

from deepseek_moe.kernels.adamw import (
    adamw_step_bf16_moments,
    adamw_step_bf16_moments_reference,
    bf16_moments_kernel_takes,
)
from deepseek_moe.kernels.cpu_build import load_adamw_library
from deepseek_moe.kernels.switch import reference_paths
from deepseek_moe.train import narrow_moments
from deepseek_moe.train.config import OptimConfig, TrainConfig
from deepseek_moe.train.narrow_moments import NarrowMomentsAdamW, check_betas
from deepseek_moe.train.optim import build_optimizer

needs_kernel = pytest.mark.skipif(load_adamw_library() is None, reason="no C++ compiler: the kernel cannot be built")
SHAPES = [(7, 5), (3, 4, 6), (11,), (1,)]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 16 elements, so parameters span several chunks and end in a partial one."""
    monkeypatch.setattr("deepseek_moe.train.narrow_moments.CHUNK", 16)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _groups(params):
    # weight decay on the matrices' group, none on the vectors'
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def _grads(step, params):
    g = torch.Generator().manual_seed(1000 + step)
    # gradients of different scales per step, so the second moment grows and decays
    return [torch.randn(p.shape, generator=g) * (0.1 + step % 3) for p in params]


def _run(make, params, steps, start=0, opt=None, sched=None):
    opt = opt or make(_groups(params))
    sched = sched or torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 4 if s < 4 else 0.5 ** (s - 3))
    for step in range(start, start + steps):
        for p, g in zip(params, _grads(step, params), strict=True):
            p.grad = g
        opt.step()
        sched.step()
        yield opt, sched


def _reference(groups):
    return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)


def _narrow(groups):
    return NarrowMomentsAdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def test_equals_torch_adamw_with_moments_rounded_to_bf16_after_every_step():
    """The reference path, bitwise: both read the same bf16-representable moments (widening is exact), apply the
    same fp32 operations in the same order (adamw_step_reference is torch's single-tensor AdamW op for op; the bias
    corrections are the same Python-float expressions) and round with the same round-to-nearest-even cast."""
    with reference_paths():
        _check_equals_torch_adamw_with_rounded_moments()


def _check_equals_torch_adamw_with_rounded_moments():
    ref_params, params = _params(), _params()
    params[1] = torch.nn.Parameter(params[1].detach().transpose(0, 2).contiguous().transpose(0, 2))  # not contiguous
    ref_steps, steps = _run(_reference, ref_params, 12), _run(_narrow, params, 12)
    for (ref, _), (opt, _) in zip(ref_steps, steps, strict=True):
        for p in ref_params:  # the independent reference: torch's AdamW, its moments rounded in place
            for key in ("exp_avg", "exp_avg_sq"):
                ref.state[p][key].copy_(ref.state[p][key].bfloat16())
        for p_ref, p in zip(ref_params, params, strict=True):
            assert torch.equal(p_ref, p)
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(ref.state[p_ref][key], opt.state[p][key].float())
            assert torch.equal(ref.state[p_ref]["step"], opt.state[p]["step"])
    assert opt.param_groups[0]["lr"] != 1e-2  # the scheduler moved the learning rate
    # and bf16 moments are not fp32 ones: the rounding changed the weights
    fp32_params = _params()
    for _ in _run(_reference, fp32_params, 12):
        pass
    assert not torch.equal(fp32_params[0], params[0])


@needs_kernel
@pytest.mark.parametrize("n", [1, 7, 8, 33, 1000])
def test_the_kernel_equals_the_reference_step_to_an_ulp(n):
    """One step from the same state: the C++ kernel's fused multiply-adds move the weight by at most an fp32 ulp
    and a moment by at most a bf16 ulp (where the fp32 difference tips its rounding). n: vector widths and tails."""
    g = torch.Generator().manual_seed(n)
    param, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    m = (torch.randn(n, generator=g) * 0.1).bfloat16()
    v = (torch.rand(n, generator=g) * 0.1).bfloat16()
    hyper = dict(beta1=0.9, beta2=0.95, eps=1e-8, decay=1 - 1e-3 * 0.1, step_size=1e-3 / (1 - 0.9 ** 3),
                 bc2_sqrt=(1 - 0.95 ** 3) ** 0.5)
    old = param.clone()
    ref = [param.clone(), grad, m.clone(), v.clone()]
    adamw_step_bf16_moments_reference(*ref, **hyper)
    assert bf16_moments_kernel_takes(param, grad, m, v)
    adamw_step_bf16_moments(param, grad, m, v, **hyper)
    # an ulp or two of the operands (the old weight, the step), not of a result that may nearly cancel them
    assert ((param - ref[0]).abs() <= 2 ** -22 * (old.abs() + hyper["step_size"])).all()
    for got, want in ((m, ref[2]), (v, ref[3])):
        got, want = got.float(), want.float()
        assert ((got - want).abs() <= 2 ** -7 * torch.maximum(got.abs(), want.abs())).all()  # a bf16 ulp
        assert (got == want).float().mean() > 0.9  # and mostly bitwise: the same update
    torch.testing.assert_close(param, ref[0], rtol=1e-6, atol=1e-7)


@needs_kernel
def test_the_optimizer_takes_the_kernel_and_stays_near_the_reference():
    kernel_params, params = _params(), _params()
    with reference_paths():
        for _ in _run(_narrow, params, 8):
            pass
    calls = []
    original = narrow_moments.adamw_step_bf16_moments

    def counted(*a, **k):
        calls.append(a[0].shape)
        return original(*a, **k)

    narrow_moments.adamw_step_bf16_moments = counted
    try:
        for _ in _run(_narrow, kernel_params, 8):
            pass
    finally:
        narrow_moments.adamw_step_bf16_moments = original
    assert len(calls) == 8 * len(SHAPES)
    for p_kernel, p in zip(kernel_params, params, strict=True):
        torch.testing.assert_close(p_kernel, p, rtol=1e-5, atol=1e-6)


def test_moments_are_bf16_and_take_half_the_bytes():
    ref_params, params = _params(), _params()
    *_, (ref, _) = _run(_reference, ref_params, 1)
    *_, (opt, _) = _run(_narrow, params, 1)

    def nbytes(o, ps):
        return sum(o.state[p][k].nbytes for p in ps for k in ("exp_avg", "exp_avg_sq"))

    assert all(opt.state[p][k].dtype == torch.bfloat16 for p in params for k in ("exp_avg", "exp_avg_sq"))
    assert nbytes(opt, params) * 2 == nbytes(ref, ref_params)


def test_state_dict_round_trip_resumes_exactly():
    whole = _params()
    for _ in _run(_narrow, whole, 10):
        pass
    params = _params()
    *_, (opt, sched) = _run(_narrow, params, 4)
    saved, saved_sched = copy.deepcopy(opt.state_dict()), sched.state_dict()  # as a file would hold them
    params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = _narrow(_groups(params))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 4 if s < 4 else 0.5 ** (s - 3))
    opt.load_state_dict(saved)
    sched.load_state_dict(saved_sched)
    assert all(opt.state[p][k].dtype == torch.bfloat16 for p in params for k in ("exp_avg", "exp_avg_sq"))
    for _ in _run(_narrow, params, 6, start=4, opt=opt, sched=sched):
        pass
    for p_whole, p in zip(whole, params, strict=True):
        assert torch.equal(p_whole, p)


def test_loading_an_fp32_adamw_state_narrows_its_moments():
    params = _params()
    *_, (ref, _) = _run(_reference, params, 2)
    opt = _narrow(_groups(params))
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    for p in params:
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(opt.state[p]["exp_avg"], ref.state[p]["exp_avg"].bfloat16())


def test_refusals():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    p.grad = torch.zeros_like(p)
    with pytest.raises(TypeError, match="torch.bfloat16 parameter of shape \\(3,\\)"):
        NarrowMomentsAdamW([p], lr=1e-3).step()
    with pytest.raises(ValueError, match="amsgrad"):
        NarrowMomentsAdamW(_params(), lr=1e-3, amsgrad=True)
    with pytest.raises(ValueError, match="fused and foreach"):
        NarrowMomentsAdamW(_params(), lr=1e-3, fused=True)


def test_beta_check_refuses_a_decay_below_bf16_resolution():
    check_betas((0.9, 0.95))
    check_betas((0.9, 0.99))  # 1 - 0.99 = 0.01 >= 2^-7
    with pytest.raises(ValueError, match="beta2 = 0.999"):
        NarrowMomentsAdamW(_params(), lr=1e-3, betas=(0.9, 0.999))
    # the reason, shown: multiplying a bf16 value by 0.999 rounds back to the same value, by 0.95 it does not
    v = torch.tensor([1.0, 1.5, 3.0], dtype=torch.bfloat16)
    assert torch.equal((v.float() * 0.999).bfloat16(), v)
    assert not torch.equal((v.float() * 0.95).bfloat16(), v)


def test_config_field_validates_and_round_trips():
    with pytest.raises(ValueError, match="optim.moments \\('fp16'\\) must be one of 'float32', 'bfloat16'"):
        OptimConfig(moments="fp16")
    with pytest.raises(ValueError, match="optim.betas .*beta2 = 0.999"):
        OptimConfig(moments="bfloat16", betas=(0.9, 0.999))
    cfg = TrainConfig(optim=OptimConfig(moments="bfloat16"))
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = cfg.to_dict()
    del old["optim"]["moments"]  # a run directory written before the field existed
    assert TrainConfig.from_dict(old).optim.moments == "float32"


def test_build_optimizer_picks_the_class():
    model = torch.nn.Linear(4, 3)
    assert type(build_optimizer(model, OptimConfig())) is torch.optim.AdamW
    opt = build_optimizer(model, OptimConfig(moments="bfloat16"))
    assert type(opt) is NarrowMomentsAdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_cli_flags_set_the_field():
    from deepseek_moe.cli.finetune_cmd import build_config
    from deepseek_moe.cli.main import build_parser
    from deepseek_moe.train.command import build_config as build_train_config

    parser = build_parser()
    args = parser.parse_args(["finetune", "BASE", "--data", "x.jsonl", "--optimizer-moments", "bfloat16"])
    assert build_config(args).train.optim.moments == "bfloat16"
    args = parser.parse_args(["finetune", "BASE", "--data", "x.jsonl"])
    assert build_config(args).train.optim.moments == "float32"
    args = parser.parse_args(["train", "--optimizer-moments", "bfloat16"])
    assert build_train_config(args).optim.moments == "bfloat16"


def test_a_finetune_with_bf16_moments_resumes_exactly(base, monkeypatch):  # noqa: F811
    from deepseek_moe.parallel import dcp

    train = config(base, "x").train
    train = train.replace(optim=dataclasses.replace(train.optim, moments="bfloat16"))
    ref = _check_resumes_exactly(base, monkeypatch, train=train)
    checkpoints = sorted(p.parent for p in ref.run_dir.rglob(dcp.METADATA))
    assert checkpoints
    moments = {path[-1]: dtype for path, (_, dtype) in dcp.stored(dcp.read_metadata(checkpoints[-1])).items()
               if path[0] == "optimizer" and path[-1] in ("exp_avg", "exp_avg_sq")}
    assert moments and set(moments.values()) == {torch.bfloat16}


@pytest.mark.parametrize("reference", [False, True])
def test_compute_copies_follow_its_steps(reference):
    """NarrowMomentsAdamW is a plain AdamW to compute_copy's global step hook (no writes_compute_copies): after
    its step the copies are stale and rebuilt at their next use, so the forward sees the new weights."""
    from deepseek_moe.nn import compute_copy as cc

    params = _params()
    for p in params:
        setattr(p, cc._ATTR, cc.ComputeCopy(p.detach().to(torch.bfloat16), p._version, p.data_ptr()))
    with reference_paths(reference):
        for _ in _run(_narrow, params, 2):
            for p in params:
                assert torch.equal(cc.compute_weight(p, torch.bfloat16), p.detach().to(torch.bfloat16))


def test_a_bf16_train_run_with_bf16_moments(tmp_path):
    """Through ``deepseek-moe train`` under bf16 autocast (the Trainer attaches compute copies): it trains, and its
    run directory keeps the field for --resume."""
    from test_cli_train import small_args

    from deepseek_moe.cli.main import main
    from deepseek_moe.train.rundir import read_run_config

    out = tmp_path / "run"
    assert main(small_args(tmp_path, "--out", str(out), "--dtype", "bf16", "--optimizer-moments", "bfloat16")) == 0
    assert read_run_config(out)["optim"]["moments"] == "bfloat16"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if r["kind"] == "val"]
    assert len(val) >= 2 and all(math.isfinite(x) for x in val) and val[-1] < val[0]


def test_a_loaded_state_with_a_refused_beta2_is_refused():
    # torch's load_state_dict takes the saved groups' hyper-parameters: a run saved with beta2 = 0.999 must not
    # resume with the moments this class keeps in bf16.
    params = _params()
    saved = torch.optim.AdamW(params, lr=1e-3).state_dict()  # betas (0.9, 0.999)
    opt = NarrowMomentsAdamW(params, lr=1e-3)
    with pytest.raises(ValueError, match="beta"):
        opt.load_state_dict(saved)
