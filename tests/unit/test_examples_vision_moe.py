"""examples/vision_moe.py end to end on a tiny budget, and its parameter arithmetic by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="examples/vision_moe.py reads scikit-learn's bundled digits")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vision_moe.py"


@pytest.fixture(scope="module")
def vision_moe():
    spec = importlib.util.spec_from_file_location("vision_moe", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["vision_moe"] = module
    spec.loader.exec_module(module)
    return module


def test_runs_and_reports_every_model(vision_moe, tmp_path, capsys):
    results = vision_moe.main(["--epochs", "6", "--dim", "32", "--width", "16", "--n-layers", "1", "--threads", "1",
                               "--out", str(tmp_path), "--quiet"])
    assert list(results) == ["moe", "dense_wide", "dense_equal"]
    for r in results.values():
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["images_per_s"] > 0
    # six epochs of a one-layer ViT already beat chance (0.1) by far on the real digits (measured 0.81)
    assert results["moe"]["test_accuracy"] > 0.5
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["moe"]["total_params"] == results["moe"]["total_params"]
    for name in ("test_accuracy.png", "routing_heatmap.png", "results.json"):
        assert (tmp_path / name).is_file(), name


def test_the_dense_models_bracket_the_moe(vision_moe):
    """dense_wide has the MoE's FFN parameters (16 W of width), dense_equal its activated FFN width (4 W)."""
    dim, width = 32, 16
    moe = vision_moe.build("moe", dim=dim, width=width, n_layers=2, n_heads=2, seed=0)
    wide = vision_moe.build("dense_wide", dim=dim, width=width, n_layers=2, n_heads=2, seed=0)
    equal = vision_moe.build("dense_equal", dim=dim, width=width, n_layers=2, n_heads=2, seed=0)
    moe_total, moe_active = vision_moe.parameter_counts(moe)
    router = 2 * 15 * dim  # the MoE's only extra weights: a (15, dim) gate per layer
    assert moe_total - router == vision_moe.parameter_counts(wide)[0]
    assert moe_active - router == vision_moe.parameter_counts(equal)[0]
    # a SwiGLU of width F has 3 dim F weights; per layer the MoE keeps 12 of 15 routed experts inactive
    assert moe_total - moe_active == 2 * 12 * 3 * dim * width
    with pytest.raises(ValueError, match="unknown model 'sparse'"):
        vision_moe.build("sparse", dim=dim, width=width, n_layers=1, n_heads=2, seed=0)


def test_patches_cover_the_image_in_order(vision_moe):
    model = vision_moe.ViT(lambda i: torch.nn.Identity(), dim=4, n_layers=0, n_heads=1)
    images = torch.arange(64, dtype=torch.float32).view(1, 8, 8)
    seen = {}
    model.embed = torch.nn.Identity()  # tokens are the raw 2x2 patches, flattened row-major
    model.pos = torch.nn.Parameter(torch.zeros(1, 17, 4))
    model.cls = torch.nn.Parameter(torch.zeros(1, 1, 4))
    model.norm = torch.nn.Identity()
    model.head = torch.nn.Identity()
    model.blocks = torch.nn.ModuleList([_Spy(seen)])
    model(images)
    assert seen["h"][0, 1].tolist() == [0, 1, 8, 9] and seen["h"][0, 2].tolist() == [2, 3, 10, 11]
    assert seen["h"][0, 16].tolist() == [54, 55, 62, 63]


class _Spy(torch.nn.Module):
    def __init__(self, seen: dict) -> None:
        super().__init__()
        self.seen = seen

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.seen["h"] = h
        return h
