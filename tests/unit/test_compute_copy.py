"""bf16 compute copies (nn/compute_copy.py) and the optimizer that keeps them (train/optim.AdamWCopies,
kernels/adamw.cpp), against what they replace: autocast's own weight casts and torch.optim.AdamW."""

import copy
import json

import pytest
import torch

from deepseek_moe.kernels.adamw import adamw_step, adamw_step_reference
from deepseek_moe.kernels.cpu_build import load_adamw_library
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.nn import compute_copy as cc
from deepseek_moe.nn.linear import Linear
from deepseek_moe.presets import get_preset
from deepseek_moe.train.checkpoint import read_model_state
from deepseek_moe.train.loop import run
from deepseek_moe.train.optim import AdamWCopies
from tests.unit.test_train_loop import small_config

needs_kernel = pytest.mark.skipif(load_adamw_library() is None, reason="no C++ compiler: the kernel cannot be built")
HYPER = dict(beta1=0.9, beta2=0.95, eps=1e-8, decay=1 - 3e-4 * 0.1, step_size=3e-4 / (1 - 0.9 ** 3),
             bc2_sqrt=(1 - 0.95 ** 3) ** 0.5)


def _state(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g) * 0.1,
            torch.rand(n, generator=g) * 0.01]


@needs_kernel
@pytest.mark.parametrize("n", [1, 17, 100_003])
def test_kernel_matches_the_reference_and_rounds_the_copy_as_torch(n):
    p, g, m, v = _state(n, 0)
    p[0] = float("nan") if n > 1 else p[0]
    ref = [t.clone() for t in (p, m, v)]
    copy_ref = torch.empty(n, dtype=torch.bfloat16)
    adamw_step_reference(ref[0], g, ref[1], ref[2], copy_ref, **HYPER)
    out = torch.empty(n, dtype=torch.bfloat16)
    adamw_step(p, g, m, v, out, **HYPER)
    for a, b in zip((p, m, v), ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, equal_nan=True)
    # the copy is exactly torch's round-to-nearest-even of the new weight; a NaN stays a NaN (its bits follow
    # whichever conversion torch's build uses, so only NaN-ness is compared)
    assert torch.equal(out.view(torch.int16)[1:], p.to(torch.bfloat16).view(torch.int16)[1:])
    assert out[0].isnan() == p[0].isnan()


def _with_copy(p: torch.nn.Parameter) -> torch.nn.Parameter:
    setattr(p, cc._ATTR, cc.ComputeCopy(p.detach().to(torch.bfloat16), p._version, p.data_ptr()))
    return p


def test_adamw_copies_steps_as_torch_adamw_and_their_states_interchange():
    torch.manual_seed(0)
    plain = [torch.nn.Parameter(torch.randn(64, 48)), torch.nn.Parameter(torch.randn(48))]
    mine = [_with_copy(torch.nn.Parameter(plain[0].detach().clone())), torch.nn.Parameter(plain[1].detach().clone())]
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    ref, opt = torch.optim.AdamW(plain, **kw), AdamWCopies(mine, **kw)
    for _ in range(6):
        for a, b in zip(plain, mine, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ref.step()
        opt.step()
        ref.zero_grad()
        opt.zero_grad()
    for a, b in zip(plain, mine, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert torch.equal(cc.copy_of(mine[0]).tensor, mine[0].detach().to(torch.bfloat16))
    assert cc.copy_of(mine[0]).matches(mine[0])
    # the same state_dict layout: AdamW resumes from AdamWCopies' checkpoint and the other way round
    back = torch.optim.AdamW(plain, **kw)
    back.load_state_dict(opt.state_dict())
    assert back.state_dict()["state"][0].keys() == ref.state_dict()["state"][0].keys()
    AdamWCopies(mine, **kw).load_state_dict(ref.state_dict())


def test_copies_follow_whatever_optimizer_changes_the_masters():
    """torch's fused AdamW writes weights without bumping their versions; the copies must still follow. So must
    the weights AdamWCopies hands to torch's step (here: one with a non-contiguous gradient) and a plain optimizer
    used on a model with copies. Step hooks run once per step."""
    torch.manual_seed(0)
    for kind in (AdamWCopies, torch.optim.AdamW):
        ws = [_with_copy(torch.nn.Parameter(torch.randn(8, 6))) for _ in range(2)]
        opt = kind(ws, lr=0.1, fused=True)
        calls: list[int] = []
        handle = opt.register_step_post_hook(lambda *a, calls=calls: calls.append(1))
        for _ in range(2):
            ws[0].grad = torch.randn(6, 8).t()  # non-contiguous: not the kernel's
            ws[1].grad = torch.randn(8, 6)
            opt.step()
            for w in ws:
                assert torch.equal(cc.compute_weight(w, torch.bfloat16), w.detach().to(torch.bfloat16)), kind
        handle.remove()
        assert len(calls) == 2


def test_adamw_copies_refuses_what_the_kernel_does_not_do():
    with pytest.raises(ValueError, match="amsgrad"):
        AdamWCopies([torch.nn.Parameter(torch.ones(2))], amsgrad=True)


def _step(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, labels=batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_model_with_copies_computes_what_autocast_computes():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = DeepSeekMoEForCausalLM(cfg).train()
    twin = copy.deepcopy(model)
    assert cc.attach(twin) == sum(1 for m in twin.modules() if isinstance(m, Linear)) + 3 * (cfg.n_layers
                                                                                               - cfg.n_dense_layers)
    third = copy.deepcopy(twin)  # its copies' records name twin's storage, so it copies its own masters
    batch = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    loss, grads = _step(model, batch)
    loss2, grads2 = _step(twin, batch)
    assert torch.equal(_step(third, batch)[0], loss)
    assert torch.equal(loss, loss2)  # bit for bit: the same bf16 operands, the gradient cast back the same way
    assert grads.keys() == grads2.keys() and all(torch.equal(grads[k], grads2[k]) for k in grads)

    # A master changed behind the copy's back (a checkpoint load, a plain optimizer) is copied again at its
    # next use.
    with torch.no_grad():
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            a.mul_(0.5)
            b.mul_(0.5)
    model.zero_grad()
    twin.zero_grad()
    assert torch.equal(_step(model, batch)[0], _step(twin, batch)[0])


def test_the_next_backward_writes_into_last_steps_gradient_memory():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = DeepSeekMoEForCausalLM(cfg).train()
    cc.attach(model)
    opt = AdamWCopies(model.parameters(), lr=1e-3, fused=True)
    batch = torch.randint(0, cfg.vocab_size, (2, 32))
    w = model.head.weight
    _step(model, batch)
    address = w.grad.data_ptr()
    opt.step()
    opt.zero_grad()
    assert w.grad is None and cc.copy_of(w).grad_buffer is not None
    _, grads = _step(model, batch)
    assert w.grad.data_ptr() == address
    # the same numbers as a fresh model in the same state, whose gradient is freshly allocated
    fresh = DeepSeekMoEForCausalLM(cfg).train()
    fresh.load_state_dict(model.state_dict())
    model.zero_grad()
    torch.testing.assert_close(_step(fresh, batch)[1]["head.weight"], grads["head.weight"], rtol=0, atol=0)
    # torch.autograd.grad still hands the gradient back (the parked buffer goes with it)
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(batch, labels=batch).loss
    (g,) = torch.autograd.grad(loss, [w])
    assert w.grad is None and torch.equal(g, grads["head.weight"])


@pytest.mark.parametrize("extra", [[], ["routing.finetune_steps=3", "routing.frozen_experts=[0, 5]",
                                        "schedule.grad_accum_steps=2"]])
def test_training_with_copies_learns_as_without(tmp_path, extra):
    """The trainer's bf16 runs with and without copies: the same first loss bit for bit, the same curve within
    bf16's noise, frozen experts still frozen, and checkpoints that resume exactly."""
    common = ["dtype=bf16", "schedule.steps=6", "routing.uniform_steps=1", "checkpoint.every=3", *extra]
    with_copies = run(small_config(tmp_path, *common, out="copies"), progress=False)
    without = run(small_config(tmp_path, *common, "compute_copies=false", out="plain"), progress=False)
    read = lambda r: [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                      if json.loads(x)["kind"] == "train"]
    a, b = read(with_copies), read(without)
    assert a[0]["ce_loss"] == b[0]["ce_loss"]
    assert all(abs(x["ce_loss"] - y["ce_loss"]) < 0.05 for x, y in zip(a, b, strict=True))
    if extra:
        before = read_model_state(with_copies.run_dir / "state/step-3")
        after = read_model_state(with_copies.run_dir / "state/step-6")
        key = "layers.1.ffn.experts.w1"
        assert (before[key][[0, 5]] == after[key][[0, 5]]).all()
        assert not (before[key][[1, 2]] == after[key][[1, 2]]).all()
    # resuming from step 3 gives step 6 exactly (the copies are rebuilt from the loaded masters)
    cfg = small_config(tmp_path, *common, "schedule.steps=6", out="copies")
    import shutil
    shutil.rmtree(with_copies.run_dir / "state/step-6")
    shutil.rmtree(with_copies.run_dir / "model", ignore_errors=True)
    resumed = run(cfg, resume=True, force=True, progress=False)
    assert resumed.val_loss == with_copies.val_loss


def test_the_config_field_is_checked():
    from deepseek_moe.train.config import TrainConfig
    with pytest.raises(ValueError, match="compute_copies"):
        TrainConfig(compute_copies="yes")  # type: ignore[arg-type]


def test_the_trainers_copies_are_never_stale_when_they_say_they_are_current(tmp_path):
    """Whenever a copy claims to match its master (the forward then uses it as is), it equals the master in bf16:
    after each of the trainer's steps, with frozen experts restored in stage 3 and gradient accumulation."""
    from deepseek_moe.train.loop import Trainer

    trainer = Trainer(small_config(tmp_path, "dtype=bf16", "schedule.steps=5", "routing.uniform_steps=1",
                                   "routing.finetune_steps=2", "routing.frozen_experts=[0, 5]",
                                   "schedule.grad_accum_steps=2"), progress=False)
    trainer.setup()
    assert isinstance(trainer.optimizer, AdamWCopies)
    copied = [p for p in trainer.model.parameters() if cc.copy_of(p) is not None]
    assert copied
    for step in range(5):
        trainer.step(step)
        current = [p for p in copied if cc.copy_of(p).matches(p)]
        assert current  # the kernel kept most copies current
        for p in current:
            assert torch.equal(cc.copy_of(p).tensor, p.detach().to(torch.bfloat16))
