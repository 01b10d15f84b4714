"""The loader reading boxes of tensors (io/streaming.Shard), on one process: any sub-box of every tensor, from
plain and FP8 block-scaled checkpoints, equals that box of the one-process ``from_pretrained`` model, and what
lies outside a process's boxes is never required nor read. (The N-process layouts are in test_shard_io.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_shard_io import _cfg

import deepseek_moe
from deepseek_moe.io import CheckpointError
from deepseek_moe.io.load import load_into, read_config
from deepseek_moe.io.streaming import Shard, skip_init
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM


def _fp8(path: Path, block: tuple[int, int]) -> None:
    """Rewrite every 2-D weight but the router's, embedding's and head's as FP8 + a weight_scale_inv per block."""
    tensors = load_file(path / "model.safetensors")
    for key in list(tensors):
        w = tensors[key]
        if w.dim() != 2 or any(s in key for s in ("embed", "lm_head", "mlp.gate.")):
            continue
        rows, cols = w.shape
        scale = torch.empty(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
        for r in range(scale.shape[0]):
            for c in range(scale.shape[1]):
                tile = w[r * block[0]:(r + 1) * block[0], c * block[1]:(c + 1) * block[1]]
                scale[r, c] = tile.abs().max().clamp(min=1e-12) / 448.0
                q[r * block[0]:(r + 1) * block[0], c * block[1]:(c + 1) * block[1]] = (tile / scale[r, c]).to(q.dtype)
        tensors[key], tensors[key + "_scale_inv"] = q, scale
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module", params=["bf16", "fp8"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(_cfg()).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    deepseek_moe.save_pretrained(model, path)
    if request.param == "fp8":
        _fp8(path, (3, 5))  # bands and column blocks that no box boundary below lines up with
    return path


def _box(shape: tuple[int, ...], how: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset, size) of a box of ``shape``: rows only (``rows``), or cut in every dimension (``inner``)."""
    if how == "rows":
        first = min(1, shape[0] - 1)
        return (first, *([0] * (len(shape) - 1))), (shape[0] - first, *shape[1:])
    offset = tuple(min(d // 3, d - 1) for d in shape)
    size = tuple(max(1, d - o - (d > 4)) for o, d in zip(offset, shape, strict=True))
    return offset, size


@pytest.mark.parametrize("how", ["rows", "inner"])
def test_any_box_of_every_tensor_equals_the_one_process_load(checkpoint: Path, how: str) -> None:
    ref = deepseek_moe.from_pretrained(checkpoint, dtype=torch.float32).state_dict()
    _, cfg = read_config(checkpoint)
    with torch.device("meta"), skip_init():
        model = DeepSeekMoEForCausalLM(cfg)
    shards, boxes = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        offset, size = _box(tuple(t.shape), how)
        shards[name] = Shard(torch.full(size, float("nan")), offset, tuple(t.shape))
        boxes[name] = tuple(slice(o, o + n) for o, n in zip(offset, size, strict=True))
    load_into(model, checkpoint, shards=shards)
    for name, shard in shards.items():
        assert torch.equal(shard.local, ref[name][boxes[name]]), name


def test_tensors_outside_the_boxes_are_neither_required_nor_read(checkpoint: Path) -> None:
    _, cfg = read_config(checkpoint)
    with torch.device("meta"), skip_init():
        model = DeepSeekMoEForCausalLM(cfg)
    state = model.state_dict(keep_vars=True)
    # This process holds experts 2..3 of every MoE layer and nothing of the embedding: the rest is whole.
    shards = {name: Shard(torch.empty(0, *t.shape[1:]), (t.shape[0], *([0] * (t.dim() - 1))), tuple(t.shape))
              for name, t in state.items() if name == "embed.weight"}
    for name, t in state.items():
        if ".experts.w" in name:
            shards[name] = Shard(torch.empty(2, *t.shape[1:]), (2, 0, 0), tuple(t.shape))
    model.to_empty(device="cpu")
    load_into(model, checkpoint, shards=shards)
    ref = deepseek_moe.from_pretrained(checkpoint, dtype=torch.float32).state_dict()
    assert torch.equal(shards["layers.1.ffn.experts.w2"].local, ref["layers.1.ffn.experts.w2"][2:4])
    assert torch.equal(model.layers[0].attn.wkv_a.weight, ref["layers.0.attn.wkv_a.weight"])


def test_a_shard_of_another_shape_is_refused_naming_the_file(checkpoint: Path) -> None:
    _, cfg = read_config(checkpoint)
    with torch.device("meta"), skip_init():
        model = DeepSeekMoEForCausalLM(cfg)
    model.to_empty(device="cpu")
    shards = {"norm.weight": Shard(torch.empty(4), (0,), (17,))}
    with pytest.raises(CheckpointError, match=r"model.safetensors: 'model.norm.weight' has shape \(16,\), expected "
                                              r"\(17,\)"):
        load_into(model, checkpoint, shards=shards)
