import json
import math

import pytest
import torch

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.moe.all_layers import moe_layers
from deepseek_moe.train.checkpoint import step_dirs
from deepseek_moe.train.config import OptimConfig, resolve_config
from deepseek_moe.train.errors import TrainError
from deepseek_moe.train.optim import build_optimizer, param_groups
from deepseek_moe.train.routing import ExpertFreezer, load_summary, orthogonal_init_experts
from deepseek_moe.train.schedule import lr_factor, routing_stage


def small_model() -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)
    moe = MoEConfig(dim=32, moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2, n_shared_experts=1)
    cfg = ModelConfig(vocab_size=64, dim=32, inter_dim=64, n_layers=2, n_dense_layers=1, n_heads=2, moe=moe,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=32)
    return DeepSeekMoEForCausalLM(cfg)


def test_lr_warms_up_linearly_then_decays_by_cosine():
    f = [lr_factor(i, steps=100, warmup_steps=10, min_lr_ratio=0.1) for i in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))
    assert lr_factor(0, steps=5, warmup_steps=0, min_lr_ratio=0.0) == pytest.approx(1.0)


def test_routing_stages():
    cfg = resolve_config(assignments=["schedule.steps=100", "routing.uniform_steps=10", "routing.finetune_steps=20"])
    stages = [routing_stage(cfg, i) for i in range(100)]
    assert stages == [1] * 10 + [2] * 70 + [3] * 20
    default = resolve_config(assignments=["schedule.steps=100"])
    assert [routing_stage(default, i) for i in (4, 5, 99)] == [1, 2, 2]


def test_no_weight_decay_on_norms_biases_and_vectors():
    model = small_model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"norm.weight", "layers.0.attn_norm.weight"}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_frozen_experts_do_not_move_under_adamw():
    model = small_model()
    opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.5))
    x = torch.randint(0, 64, (4, 16))
    for _ in range(2):  # momentum from before the freeze
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    experts = next(moe for _, moe in moe_layers(model)).experts
    before = {n: w.detach().clone() for n, w in (("w1", experts.w1), ("w2", experts.w2), ("w3", experts.w3))}
    freezer = ExpertFreezer(model, (1, 3))
    for _ in range(3):
        model(x, labels=x).loss.backward()
        assert experts.w1.grad[[1, 3]].abs().sum() == 0
        opt.step()
        freezer.restore()
        opt.zero_grad()
    for n, w in (("w1", experts.w1), ("w2", experts.w2), ("w3", experts.w3)):
        assert torch.equal(w[[1, 3]], before[n][[1, 3]])
        assert not torch.equal(w[[0, 2]], before[n][[0, 2]])
    freezer.remove()
    with pytest.raises(TrainError, match="frozen_experts"):
        ExpertFreezer(model, (9,))


def _gram(w_XY: torch.Tensor) -> torch.Tensor:
    return w_XY @ w_XY.T


@pytest.mark.parametrize(("n_experts", "inter_dim"), [(4, 16), (4, 8)])  # E*F = 64 > D = 32; E*F = 32 <= D
def test_orthogonal_init_gives_each_expert_orthonormal_rows_and_disjoint_subspaces_when_they_fit(n_experts, inter_dim):
    from deepseek_moe import MoE

    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=32, moe_inter_dim=inter_dim, n_routed_experts=n_experts, n_activated_experts=2))
    orthogonal_init_experts(moe)
    ex = moe.experts
    E, F, D = ex.w1.shape
    for e in range(E):  # every expert on its own: w1, w3 rows and w2 columns orthonormal
        for w_FD in (ex.w1[e], ex.w3[e], ex.w2[e].T):
            torch.testing.assert_close(_gram(w_FD.detach()), torch.eye(F), atol=1e-5, rtol=0)
    for w in (ex.w1, ex.w3, ex.w2.transpose(1, 2)):
        cross = w.detach().reshape(E * F, D) @ w.detach().reshape(E * F, D).T - torch.eye(E * F)
        if E * F <= D:  # the experts' rows fit together: all E*F mutually orthonormal
            assert cross.abs().max() < 1e-5
        else:  # they cannot: experts overlap (only each one's own block is orthonormal)
            assert cross.abs().max() > 0.1
    # The model-level entry point reaches every MoE layer.
    model = small_model()
    orthogonal_init_experts(model)
    w1 = next(moe for _, moe in moe_layers(model)).experts.w1.detach()
    torch.testing.assert_close(_gram(w1[0]), torch.eye(w1.shape[1]), atol=1e-5, rtol=0)


def test_load_summary():
    counts = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    s = load_summary(counts)
    assert s["imbalance"] == pytest.approx((1 + 4) / 2)
    assert s["cv"] == pytest.approx((0 + math.sqrt(3)) / 2)


def test_incomplete_checkpoints_are_ignored(tmp_path):
    for name in ("step-2", "step-10", ".tmp-step-12-99", "step-4"):
        (tmp_path / name).mkdir()
    for name in ("step-2", "step-10", ".tmp-step-12-99"):
        (tmp_path / name / "trainer.json").write_text("{}")
    assert [p.name for p in step_dirs(tmp_path)] == ["step-2", "step-10"]  # step-4 never finished


def test_state_codec_round_trips_optimizer_and_generator_state():
    import random

    import numpy as np

    from deepseek_moe.train.state_codec import decode, encode

    model = small_model()
    opt = build_optimizer(model, OptimConfig())
    x = torch.randint(0, 64, (2, 8))
    model(x, labels=x).loss.backward()
    opt.step()
    tree = {"optimizer": opt.state_dict(), "python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), "mixed": {1: None, "a": (True, 2.5, float("inf")), "$x": [3]}}
    tensors, skeleton = encode(tree)
    back = decode(json.loads(json.dumps(skeleton)), tensors)
    assert back["python"] == tree["python"] and back["mixed"] == tree["mixed"]
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], tree["numpy"][1])
    assert back["numpy"][1].dtype == tree["numpy"][1].dtype and back["numpy"][2:] == tree["numpy"][2:]
    assert torch.equal(back["torch"], tree["torch"])
    state, ref = back["optimizer"], opt.state_dict()
    assert state["param_groups"] == ref["param_groups"] and state["state"].keys() == ref["state"].keys()
    for i, entry in ref["state"].items():
        assert all(torch.equal(state["state"][i][k], v) and state["state"][i][k].dtype == v.dtype
                   for k, v in entry.items())
    with pytest.raises(ValueError, match="tensor"):
        decode({"$tensor": "missing"}, {})
    with pytest.raises(ValueError, match="dtype"):
        decode({"$ndarray": [1], "dtype": "object"}, {})
