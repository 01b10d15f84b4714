"""Checkpoint writes are atomic: a save over an existing checkpoint, interrupted at any file operation, leaves
a directory that loads as the old model or the new one (never a mix, never a stale index winning); other files
in the directory survive; ``quantize_checkpoint`` into a used directory replaces what it held; the quantised
model's attribute is ``quantization_config``, the name the sharded saver's guard checks."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import deepseek_moe.io.atomic as atomic
from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.io import load_pretrained, save_pretrained
from deepseek_moe.io.safetensors_file import SafetensorsWriter
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.quant import QuantConfig, quant_config_of, quantize_checkpoint, quantize_model


def _model(seed: int) -> DeepSeekMoEForCausalLM:
    moe = MoEConfig(dim=32, moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2)
    cfg = ModelConfig(vocab_size=64, dim=32, inter_dim=48, n_layers=2, n_dense_layers=1, n_heads=2, moe=moe,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=64,
                      original_seq_len=64)
    torch.manual_seed(seed)
    return DeepSeekMoEForCausalLM(cfg).eval()


class Fault(Exception):
    pass


def _which(path: Path, models: dict[str, DeepSeekMoEForCausalLM]) -> str:
    """Which of ``models`` the checkpoint at ``path`` holds, exactly ("none" if it does not load)."""
    try:
        loaded = load_pretrained(path)
    except Exception:
        return "none"
    state = loaded.state_dict()
    for name, model in models.items():
        if all(torch.equal(t, state[k]) for k, t in model.state_dict().items()):
            return name
    return "mix"


def _faulty(monkeypatch: pytest.MonkeyPatch, fail_at: int) -> list[int]:
    """Make the ``fail_at``-th call of any file operation a save uses raise (0: never); returns the counter."""
    calls = [0]
    targets: list[tuple[Any, str]] = [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "link"),
                                      (shutil, "copy2"), (Path, "write_text"), (Path, "unlink"),
                                      (SafetensorsWriter, "write"), (atomic, "exchange")]
    for owner, name in targets:
        original = getattr(owner, name)

        def wrapped(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == fail_at:
                raise Fault(f"injected at call {fail_at}")
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapped)
    return calls


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two renames"])
@pytest.mark.parametrize("new_shards", ["1GB", "20KB"])
def test_a_save_interrupted_anywhere_leaves_the_old_or_the_new_checkpoint(tmp_path: Path, new_shards: str,
                                                                          exchange: bool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if not exchange:  # a system without RENAME_EXCHANGE: the fallback must not leave a mix either
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    old, new = _model(0), _model(1)
    base = tmp_path / "base"
    save_pretrained(old, base, max_shard_size="12KB")  # sharded: an index a partial save could leave stale
    (base / "README.md").write_text("kept\n")
    (base / "notes").mkdir()
    (base / "notes" / "a.txt").write_text("kept too\n")
    shutil.copytree(base, tmp_path / "count")
    with pytest.MonkeyPatch.context() as mp:
        calls = _faulty(mp, 0)
        save_pretrained(new, tmp_path / "count", max_shard_size=new_shards)  # over a checkpoint, as below
        n_calls = calls[0]
    assert n_calls > 5
    seen = set()
    for fail_at in range(1, n_calls + 1):
        path = tmp_path / f"run{fail_at}"
        shutil.copytree(base, path)
        with pytest.MonkeyPatch.context() as mp:
            _faulty(mp, fail_at)
            try:
                save_pretrained(new, path, max_shard_size=new_shards)
            except Fault:
                pass
        state = _which(path, {"old": old, "new": new})
        assert state in ("old", "new"), f"interrupted at file operation {fail_at} of {n_calls}: {state}"
        assert (path / "README.md").read_text() == "kept\n"
        assert (path / "notes" / "a.txt").read_text() == "kept too\n"
        seen.add(state)
        shutil.rmtree(path)
    assert seen == {"old", "new"}  # the last operations come after the swap
    save_pretrained(new, base, max_shard_size=new_shards)
    assert _which(base, {"old": old, "new": new}) == "new"
    shards = sorted(p.name for p in base.glob("model*.safetensors"))
    index = base / "model.safetensors.index.json"
    expected = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    assert shards == expected  # no stale shard of the old save
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".base.")]  # a clean save leaves no stage


def test_save_into_a_linked_directory_keeps_the_link(tmp_path: Path) -> None:
    save_pretrained(_model(0), tmp_path / "real")
    os.symlink("real", tmp_path / "link")
    new = _model(1)
    save_pretrained(new, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert _which(tmp_path / "real", {"new": new}) == "new"


def test_quantize_checkpoint_into_a_used_directory_replaces_it(tmp_path: Path) -> None:
    """A quantised checkpoint copied over a sharded one: before, the old index stayed and won."""
    save_pretrained(_model(0), tmp_path / "float")
    quantized = quantize_checkpoint(tmp_path / "float", tmp_path / "q8", QuantConfig(bits=8))
    used = tmp_path / "used"
    save_pretrained(_model(1), used, max_shard_size="12KB")
    (used / "notes.txt").write_text("mine\n")
    quantize_checkpoint(quantized, used, QuantConfig(bits=8))
    assert not (used / "model.safetensors.index.json").exists()
    assert (used / "notes.txt").read_text() == "mine\n"
    a, b = load_pretrained(quantized), load_pretrained(used)
    assert quant_config_of(b) == quant_config_of(a) is not None
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k
    # The same from a float source (quantised while loading) over a sharded directory.
    quantize_checkpoint(tmp_path / "float", used, QuantConfig(bits=8))
    assert not (used / "model.safetensors.index.json").exists()


def test_quantised_model_carries_quantization_config_and_the_sharded_saver_refuses_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import deepseek_moe.parallel.shard_io as shard_io

    model = quantize_model(_model(0), QuantConfig(bits=8))
    assert isinstance(model.quantization_config, QuantConfig)
    assert not hasattr(model, "quant_config")
    monkeypatch.setattr(shard_io.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(shard_io.dist, "get_world_size", lambda *a: 2)
    with pytest.raises(ValueError, match="writes unquantised models"):
        shard_io.save_pretrained_sharded(model, tmp_path / "out")
    save_pretrained(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["bits"] == 8
