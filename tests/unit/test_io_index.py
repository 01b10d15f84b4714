"""A sharded checkpoint's index may name only plain files inside the checkpoint directory: anything that would
open a file elsewhere (``..``, absolute paths, subdirectories, links out) is refused naming the index and entry;
links inside the directory and huggingface_hub's snapshot -> blobs layout still load."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.io import CheckpointError, load_pretrained, save_pretrained
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[DeepSeekMoEForCausalLM, Path]:
    moe = MoEConfig(dim=32, moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2)
    cfg = ModelConfig(vocab_size=64, dim=32, inter_dim=48, n_layers=2, n_dense_layers=1, n_heads=2, moe=moe,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=64,
                      original_seq_len=64)
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("sharded") / "ckpt"
    save_pretrained(model, path, max_shard_size="20KB")
    assert (path / INDEX).is_file()
    return model, path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _point_first_shard_at(path: Path, entry: str) -> str:
    """Rewrite the index so every key of the first shard maps to ``entry``; returns the shard's name."""
    index = json.loads((path / INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (entry if v == first else v) for k, v in index["weight_map"].items()}
    (path / INDEX).write_text(json.dumps(index))
    return first


def _escapes(tmp: Path, ckpt: Path) -> dict[str, str]:
    """entry -> how it escapes; each names a real copy of the shard outside the directory (so, before the
    check, the load succeeded: the test fails on the old loader)."""
    first = sorted(p.name for p in ckpt.glob("model-*.safetensors"))[0]
    outside = tmp / "outside.safetensors"
    shutil.copyfile(ckpt / first, outside)
    (tmp / "ckpt" / "sub").mkdir(exist_ok=True)
    (tmp / "ckpt" / "sub" / "inner.safetensors").write_bytes(outside.read_bytes())
    os.symlink("../outside.safetensors", tmp / "ckpt" / "link.safetensors")
    return {"../outside.safetensors": "parent", str(outside): "absolute", "sub/../../outside.safetensors": "dotdot",
            "sub/inner.safetensors": "subdirectory", "link.safetensors": "link out"}


@pytest.mark.parametrize("kind", ["parent", "absolute", "dotdot", "subdirectory", "link out"])
def test_index_entry_outside_the_directory_is_refused(sharded: tuple[DeepSeekMoEForCausalLM, Path],
                                                      tmp_path: Path, kind: str) -> None:
    _, src = sharded
    ckpt = _copy(src, tmp_path / "ckpt")
    entry = next(e for e, k in _escapes(tmp_path, ckpt).items() if k == kind)
    _point_first_shard_at(ckpt, entry)
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / INDEX)) + ".*" + re.escape(repr(entry))):
        load_pretrained(ckpt)


def test_links_inside_the_directory_and_the_hub_cache_layout_load(sharded: tuple[DeepSeekMoEForCausalLM, Path],
                                                                  tmp_path: Path) -> None:
    model, src = sharded
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        expected = model(ids).logits
    # A shard stored under another name, linked from the name the index gives.
    inside = _copy(src, tmp_path / "inside")
    first = sorted(p.name for p in inside.glob("model-*.safetensors"))[0]
    os.replace(inside / first, inside / "stored.bin")
    os.symlink("stored.bin", inside / first)
    # huggingface_hub: <repo>/snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--x--y"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        shutil.copyfile(f, repo / "blobs" / f"h{i}")
        os.symlink(f"../../blobs/h{i}", snapshot / f.name)
    for path in (inside, snapshot):
        with torch.no_grad():
            assert torch.equal(load_pretrained(path)(ids).logits, expected)


def test_non_string_entry_is_refused(sharded: tuple[DeepSeekMoEForCausalLM, Path], tmp_path: Path) -> None:
    _, src = sharded
    ckpt = _copy(src, tmp_path / "ckpt")
    index = json.loads((ckpt / INDEX).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = ["model-00001-of-00002.safetensors"]
    (ckpt / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        load_pretrained(ckpt)
