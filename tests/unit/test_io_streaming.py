"""The streaming loader: dtype kept from the files, the selection and transform hooks, companion keys, reading
without a memory map, and the error that names a missing tensor."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.io import CheckpointError, LoadHooks, TensorSource, load_pretrained, save_pretrained
from deepseek_moe.io.safetensors_file import SafetensorsFile
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM


def _cfg(**changes: Any) -> ModelConfig:
    moe = MoEConfig(dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2, n_shared_experts=1)
    return ModelConfig(vocab_size=64, dim=32, inter_dim=48, n_layers=3, n_dense_layers=1, n_heads=2, moe=moe,
                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=64,
                       original_seq_len=64, **changes)


def _saved(tmp_path: Path, dtype: torch.dtype = torch.float32, **changes: Any) -> tuple[DeepSeekMoEForCausalLM, Path]:
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(_cfg(**changes)).to(dtype).eval()
    save_pretrained(model, tmp_path)
    return model, tmp_path


def _drop_config_dtype(path: Path) -> None:
    raw = json.loads((path / "config.json").read_text())
    raw.pop("dtype", None)
    raw.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtype_is_kept_from_the_files_when_none_is_asked(tmp_path: Path, dtype: torch.dtype) -> None:
    model, path = _saved(tmp_path, dtype)
    _drop_config_dtype(path)
    loaded = load_pretrained(path)
    assert {p.dtype for n, p in loaded.named_parameters() if not n.endswith("ffn.gate.weight")} == {dtype}
    assert loaded.layers[1].ffn.gate.weight.dtype == torch.float32  # the router stays fp32
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a.to(b.dtype), b), name


def test_asked_dtype_wins_and_buffers_keep_theirs(tmp_path: Path) -> None:
    moe = {"score_func": "sigmoid", "use_routing_bias": True, "group_score_func": "top2_sum", "n_expert_groups": 2,
           "n_limited_groups": 1}
    torch.manual_seed(0)
    cfg = _cfg()
    model = DeepSeekMoEForCausalLM(cfg.replace(moe=cfg.moe.replace(**moe)))
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for n, p in loaded.named_parameters() if not n.endswith("ffn.gate.weight")} == {torch.bfloat16}
    assert loaded.layers[1].ffn.gate.weight.dtype == torch.float32
    assert loaded.layers[1].ffn.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(loaded.layers[1].ffn.experts.w2, model.layers[1].ffn.experts.w2.bfloat16())


def test_nothing_is_left_on_meta_and_the_model_runs(tmp_path: Path) -> None:
    model, path = _saved(tmp_path, tie_word_embeddings=True)
    loaded = load_pretrained(path)
    assert all(t.device.type == "cpu" for t in [*loaded.parameters(), *loaded.buffers()])
    assert loaded.head.weight is loaded.embed.weight
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def _record_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    original = SafetensorsFile.read_into

    def read_into(self: SafetensorsFile, key: str, out: torch.Tensor, *, start: int = 0) -> None:
        reads.append(key)
        original(self, key, out, start=start)

    monkeypatch.setattr(SafetensorsFile, "read_into", read_into)
    return reads


def test_select_loads_only_what_it_selects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer 1 keeps experts 2..5 (a shard); layer 2's experts and the head are not loaded at all."""
    model, path = _saved(tmp_path)
    reads = _record_reads(monkeypatch)

    def select(name: str, expert: int | None) -> bool:
        if name == "head.weight" or name.startswith("layers.2.ffn.experts."):
            return False
        return expert is None or not name.startswith("layers.1.") or 2 <= expert < 6

    loaded = load_pretrained(path, hooks=LoadHooks(select=select))
    experts = loaded.layers[1].ffn.experts
    assert (experts.n_experts, experts.offset) == (4, 2)
    for w in ("w1", "w2", "w3"):
        assert torch.equal(getattr(experts, w), getattr(model.layers[1].ffn.experts, w)[2:6])
    assert loaded.layers[2].ffn.experts.w1.device.type == "meta"
    assert loaded.head.weight.device.type == "meta"
    assert torch.equal(loaded.layers[2].ffn.gate.weight, model.layers[2].ffn.gate.weight)
    not_read = [k for k in reads if k == "lm_head.weight" or re.match(r"model\.layers\.2\.mlp\.experts\.", k)
                or re.match(r"model\.layers\.1\.mlp\.experts\.[0167]\.", k)]
    assert reads and not not_read, f"read tensors that were not selected: {not_read}"


def test_select_of_non_contiguous_experts_is_refused(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    with pytest.raises(ValueError, match=r"experts \[0, 2\] of layers.\d.ffn.experts.*contiguous"):
        load_pretrained(path, hooks=LoadHooks(select=lambda n, e: e is None or e in (0, 2)))


def test_transform_writes_what_it_returns(tmp_path: Path) -> None:
    """A quantiser-shaped transform: ``prepare`` adds a scale buffer, ``transform`` fills the weight and it."""
    model, path = _saved(tmp_path)
    seen: list[tuple[str, int | None, tuple[int, ...]]] = []

    def prepare(m: torch.nn.Module) -> None:
        wo = m.get_submodule("layers.0.attn.wo")
        wo.register_buffer("weight_scale", torch.empty(wo.weight.shape[0], device="meta"))

    def transform(name: str, expert: int | None, src: TensorSource) -> dict[str, torch.Tensor] | None:
        seen.append((name, expert, src.shape))
        if name == "layers.0.attn.wo.weight":
            w = torch.cat([src.read_rows(0, 10), src.read_rows(10, src.shape[0])])  # by rows
            scale = w.abs().amax(dim=1)
            return {name: w / scale[:, None], "layers.0.attn.wo.weight_scale": scale}
        if name == "layers.1.ffn.experts.w2":
            return {name: 2 * src.read()}
        return None

    loaded = load_pretrained(path, hooks=LoadHooks(prepare=prepare, transform=transform))
    wo = model.layers[0].attn.wo.weight
    got = loaded.layers[0].attn.wo
    torch.testing.assert_close(got.weight * got.weight_scale[:, None], wo)
    assert torch.equal(loaded.layers[1].ffn.experts.w2, 2 * model.layers[1].ffn.experts.w2)
    assert ("layers.1.ffn.experts.w2", 5, (32, 16)) in seen


def test_companion_keys_fill_prepared_tensors_and_a_missing_one_is_named(tmp_path: Path) -> None:
    """``X.weight_scale`` in the file fills our ``...weight_scale`` (a quantised format's scales)."""
    model, path = _saved(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight_scale"] = torch.arange(32.0)
    tensors["model.layers.1.mlp.experts.3.gate_proj.weight_scale"] = torch.arange(16.0)
    save_file(tensors, path / "model.safetensors")

    def prepare(m: torch.nn.Module) -> None:
        m.get_submodule("layers.0.attn.wo").register_buffer("weight_scale", torch.empty(32, device="meta"))
        m.get_submodule("layers.1.ffn.experts").register_buffer("w1_scale", torch.empty(8, 16, device="meta"))

    with pytest.raises(CheckpointError, match=re.escape("'model.layers.1.mlp.experts.0.gate_proj.weight_scale'")):
        load_pretrained(path, hooks=LoadHooks(prepare=prepare))
    for e in range(8):
        tensors[f"model.layers.1.mlp.experts.{e}.gate_proj.weight_scale"] = torch.full((16,), float(e))
    save_file(tensors, path / "model.safetensors")
    loaded = load_pretrained(path, hooks=LoadHooks(prepare=prepare))
    assert torch.equal(loaded.layers[0].attn.wo.weight_scale, torch.arange(32.0))
    assert torch.equal(loaded.layers[1].ffn.experts.w1_scale[3], torch.full((16,), 3.0))


def test_missing_tensor_is_named_with_its_checkpoint_key(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.6.down_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) 'model.layers.2.mlp.experts.6.down_proj.weight'"):
        load_pretrained(path)


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model.safetensors.*data_offsets"):
        load_pretrained(path)


def test_reader_converts_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversion larger than the buffer goes through it chunk by chunk and comes out exact."""
    monkeypatch.setattr("deepseek_moe.io.safetensors_file.CONVERT_CHUNK_BYTES", 64)
    t = torch.randn(37, 11).bfloat16()
    save_file({"t": t}, tmp_path / "x.safetensors")
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert torch.equal(f.read("t", dtype=torch.float32), t.float())
        assert torch.equal(f.read("t", start=11 * 5, shape=(3, 11)), t[5:8])
