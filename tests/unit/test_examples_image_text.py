"""examples/image_text.py: modality-aware routing never picks an expert outside the token's modality's groups (checked
against a per-token brute-force softmax and top-K over the allowed experts), its balance loss stays finite, the
scenes' questions have the answers a hand reading of the scene gives, and main() on a tiny budget prints the
table, returns the JSON keys with accuracies in [0, 1] and writes the heatmaps."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from deepseek_moe import MoE, MoEConfig

PATH = Path(__file__).resolve().parents[2] / "examples" / "image_text.py"


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("image_text_example", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclass-free, but keep imports of the module resolvable
    spec.loader.exec_module(module)
    return module


def cfg(**kw) -> MoEConfig:
    return MoEConfig(**{"dim": 16, "moe_inter_dim": 8, "n_routed_experts": 9, "n_activated_experts": 2,
                        "n_shared_experts": 1, "expert_loss_alpha": 0.01, **kw})


def test_allowed_experts_groups(ex) -> None:
    allowed = ex.allowed_experts(2, 3, 4)
    assert allowed[ex.IMAGE_TOKEN].tolist() == [True] * 2 + [False] * 3 + [True] * 4
    assert allowed[ex.TEXT_TOKEN].tolist() == [False] * 2 + [True] * 3 + [True] * 4


def test_restricted_router_never_picks_a_disallowed_expert(ex) -> None:
    c = cfg()
    allowed = ex.allowed_experts(3, 3, 3)
    torch.manual_seed(0)
    restricted = ex.ModalityRouter(c, allowed)
    free = ex.ModalityRouter(c, allowed, restrict=False)
    free.load_state_dict(restricted.state_dict())
    with torch.no_grad():
        restricted.weight.normal_(std=1.0)  # spread affinities, so free routing strays across groups
        free.weight.copy_(restricted.weight)
    x = torch.randn(400, c.dim)
    modality = torch.randint(0, 2, (400,))
    restricted.modality_T = modality
    r = restricted(x)
    f = free(x)
    logits = x @ restricted.weight.T
    for t in range(400):  # brute force: softmax and top-K over this token's allowed experts only
        ok = allowed[modality[t]]
        assert bool(ok[r.indices_TK[t]].all()), f"token {t} ({int(modality[t])}) chose {r.indices_TK[t].tolist()}"
        expect = torch.zeros(c.n_routed_experts)
        expect[ok] = logits[t, ok].softmax(-1)
        torch.testing.assert_close(r.scores_TE[t], expect, atol=1e-6, rtol=1e-5)
        assert set(r.indices_TK[t].tolist()) == set(expect.topk(c.n_activated_experts).indices.tolist())
    # the same router unrestricted does choose disallowed experts: the check above can fail
    f_ok = allowed[modality].gather(1, f.indices_TK)
    assert int((~f_ok).sum()) > 50


def test_restricted_router_needs_its_modalities(ex) -> None:
    router = ex.ModalityRouter(cfg(), ex.allowed_experts(3, 3, 3))
    with pytest.raises(ValueError, match="modality_T"):
        router(torch.randn(5, 16))
    router.modality_T = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"modality_T must be set to shape \(5,\)"):
        router(torch.randn(5, 16))
    with pytest.raises(ValueError, match="at least n_activated_experts"):
        ex.ModalityRouter(cfg(n_routed_experts=3, n_activated_experts=3), ex.allowed_experts(1, 1, 1))


def test_balance_loss_stays_finite_under_the_mask(ex) -> None:
    c = cfg()
    moe = MoE(c)
    moe.gate = ex.ModalityRouter(c, ex.allowed_experts(3, 3, 3))
    moe.train()
    x = torch.randn(2, 10, c.dim, requires_grad=True)
    moe.gate.modality_T = torch.tensor([0] * 6 + [1] * 4).repeat(2)
    y = moe(x)
    aux = float(moe.aux_loss.detach())
    assert math.isfinite(aux) and aux > 0
    (y.sum() + moe.aux_loss).backward()
    assert torch.isfinite(moe.gate.weight.grad).all() and torch.isfinite(x.grad).all()


def test_questions_answer_a_hand_read_scene(ex) -> None:
    objects = [("red", "square", 0, 0), ("blue", "circle", 1, 2), ("green", "circle", 2, 1)]
    qa = dict(ex.questions(objects, torch.Generator().manual_seed(0)))
    assert qa["what colour is the square"] == "red"
    assert "what colour is the circle" not in qa  # two circles: ambiguous, not asked
    assert qa["how many circles"] == "two" and qa["how many triangles"] == "zero"
    assert qa["what shape is left of the green one"] == "square"
    assert "what shape is left of the blue one" not in qa  # two objects left of it
    img = ex.render([("red", "square", 0, 0)], torch.Generator().manual_seed(0))
    assert img[0, 2:6, 2:6].mean() > 0.8 and img[2, 2:6, 2:6].mean() < 0.2  # red pixels in the first cell
    assert img[:, 10:, 10:].mean() < 0.1  # and nothing elsewhere


def test_main_tiny(ex, tmp_path, capsys) -> None:
    result = ex.main(["--tiny", "--seconds", "30", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    table = out[out.index("model"):]
    for name in ("moe_modality", "moe_free", "dense"):
        assert name in table
        row = result[name]
        assert 0.0 <= row["test_acc"] <= 1.0 and 0.0 <= row["train_acc"] <= 1.0
        assert 1 <= row["steps"] <= 3
    assert result["moe_modality"]["disallowed_share"] == 0.0
    assert result["moe_modality"]["params"] == result["moe_free"]["params"]
    assert set(result["heatmaps"]) == {"moe_modality", "moe_free"}
    for path in result["heatmaps"].values():
        assert Path(path).stat().st_size > 1000
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(result))


def test_max_steps_alone_is_an_equal_step_budget(ex) -> None:
    # --max-steps without --seconds: no time limit, so a slower model is not cut short (an equal-step comparison)
    assert ex.budget(None, 300) == (math.inf, 300)
    assert ex.budget(None, None) == (120.0, ex.NO_STEP_CAP)  # neither: the 120 s default
    assert ex.budget(60.0, 300) == (60.0, 300)  # both: whichever ends first
    with pytest.raises(ValueError, match=r"--max-steps \(0\) must be >= 1"):
        ex.budget(None, 0)
    with pytest.raises(ValueError, match=r"--seconds \(0.0\) must be > 0"):
        ex.budget(0.0, None)


def test_main_tiny_by_steps(ex, tmp_path, capsys) -> None:
    result = ex.main(["--tiny", "--max-steps", "2", "--threads", "1", "--out", str(tmp_path)])
    assert all(result[name]["steps"] == 2 for name in ("moe_modality", "moe_free", "dense"))
    assert result["seconds_per_model"] is None and result["max_steps"] == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
