"""Hugging Face checkpoints straight into the shards of a model laid out over processes, and back out streamed
from the ranks (parallel/shard_io.py), compared with one process: ``from_pretrained`` and ``save_pretrained``.

Loaded shards, gathered, must equal the one-process model bit for bit; each rank must read only its part of the
files (the bytes read over the ranks sum to the checkpoint's once); the files saved from the ranks must hold the
same tensors, byte for byte, as the one-process save of the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import run_ranks
from safetensors import safe_open

import deepseek_moe
from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM


def _cfg(**moe: object) -> ModelConfig:
    # vocab 37: uneven FSDP shards (19 + 18 rows); 6 experts: uneven over 2 x 2 (2 + 1 per expert-parallel half)
    return ModelConfig(vocab_size=37, dim=16, inter_dim=24, n_layers=3, n_dense_layers=1, n_heads=2, q_lora_rank=0,
                       kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, max_seq_len=16,
                       original_seq_len=16,
                       moe=MoEConfig(dim=16, moe_inter_dim=8, n_routed_experts=6, n_activated_experts=2,
                                     n_shared_experts=1, **moe))  # type: ignore[arg-type]


def _checkpoint(path: Path, cfg: ModelConfig, seed: int = 0) -> DeepSeekMoEForCausalLM:
    torch.manual_seed(seed)
    model = DeepSeekMoEForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the init's zeros/ones: every tensor tells its rows apart
    deepseek_moe.save_pretrained(model, path)
    return model


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or sharded)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118  (safe_open is not a mapping)
                assert key not in out, f"{key} in two files"
                out[key] = st.get_tensor(key)
    return out


def assert_same_checkpoint(ours: Path, reference: Path) -> None:
    """Same config.json, same keys, each tensor's bytes equal; the index lists every key in its file."""
    assert json.loads((ours / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    a, b = _tensors(ours), _tensors(reference)
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].contiguous().view(-1).view(torch.uint8).equal(b[key].contiguous().view(-1).view(torch.uint8)), key
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(b)
    for key, name in index["weight_map"].items():
        with safe_open(str(ours / name), "pt") as st:
            assert key in st.keys()
    assert not [p.name for p in ours.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def _checkpoint_bytes(path: Path) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(path).values())


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DeepSeekMoEForCausalLM, Path]:
    root = tmp_path_factory.mktemp("shardio")
    model = _checkpoint(root / "src", _cfg(n_expert_groups=2, n_limited_groups=2))  # 2 ranks of experts
    reference = root / "reference"  # the one-process save of the one-process load
    deepseek_moe.save_pretrained(deepseek_moe.from_pretrained(root / "src"), reference)
    return root / "src", model, reference


def test_fsdp_load_reads_only_the_shards_and_equals_one_process(v2: tuple[Path, DeepSeekMoEForCausalLM, Path],
                                                               tmp_path: Path) -> None:
    src, _, reference = v2
    out = tmp_path / "model"
    ranks = run_ranks(2, "fsdp", module="shard_io_workers",
                      extra_env={"SHARDIO_SRC": str(src), "SHARDIO_OUT": str(out)})
    one = deepseek_moe.from_pretrained(src)
    want = one.state_dict()
    for r in ranks:
        assert sorted(r["state"]) == sorted(want)
        for name, t in want.items():
            assert r["state"][name].dtype == t.dtype and torch.equal(r["state"][name], t), name
    # Every byte of the files is read once, by one rank: no rank reads what it does not hold.
    total = _checkpoint_bytes(src)
    assert sum(r["read"] for r in ranks) == total
    assert all(0 < r["read"] < total for r in ranks)
    assert all(r["local_bytes"] < total for r in ranks)
    with torch.no_grad():
        logits = one(torch.arange(2 * 7).remainder(37).view(2, 7)).logits
    for r in ranks:
        torch.testing.assert_close(r["logits"], logits, rtol=1e-5, atol=1e-6)
    assert ranks[0]["format"] == "deepseek_v2"
    assert_same_checkpoint(out, reference)
    assert len(list(out.glob("model-*.safetensors"))) == 2  # both ranks wrote their share


def test_the_training_layout_and_column_shards_on_a_2d_mesh(v2: tuple[Path, DeepSeekMoEForCausalLM, Path], tmp_path: Path) -> None:
    src, _, reference = v2
    out = tmp_path / "model"
    ranks = run_ranks(4, "expert_mesh", module="shard_io_workers", timeout_s=400,
                      extra_env={"SHARDIO_SRC": str(src), "SHARDIO_OUT": str(out)})
    want = deepseek_moe.from_pretrained(src).state_dict()
    assert "_StridedShard" in ranks[0]["strided"]["placements"]
    assert "Shard(dim=1)" in ranks[0]["columns"]["placements"]
    one = deepseek_moe.from_pretrained(src)
    with torch.no_grad():
        logits = one(torch.arange(2 * 7).remainder(37).view(2, 7)).logits
    for r in ranks:
        for case in ("strided", "columns"):
            got = r[case]["state"]
            for name, t in want.items():
                assert torch.equal(got[name], t), (case, name)
        torch.testing.assert_close(r["strided"]["logits"], logits, rtol=1e-5, atol=1e-6)
    assert_same_checkpoint(out, reference)


def test_save_from_expert_parallelism_alone_replacing_an_old_save(v2: tuple[Path, DeepSeekMoEForCausalLM, Path],
                                                 tmp_path: Path) -> None:
    src, _, reference = v2
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.safetensors").write_text("an earlier save: replaced whole")
    ranks = run_ranks(2, "expert_parallel", module="shard_io_workers",
                      extra_env={"SHARDIO_SRC": str(src), "SHARDIO_OUT": str(out)})
    assert [r["experts"] for r in ranks] == [3, 3]
    assert_same_checkpoint(out, reference)
    assert not (out / "stale.safetensors").exists()


@pytest.mark.slow
def test_a_two_process_run_writes_model_from_the_ranks_and_export_hf_matches(tmp_path: Path) -> None:
    """``train --nproc 2``: model/ comes from both ranks (two files + index) and holds exactly the weights of the
    final checkpoint, which ``export hf`` writes on one process from the run's state."""
    import subprocess
    import sys

    from deepseek_moe.cli.main import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"m{i:02d}.py").write_text("".join(f"def f{i}_{j}(x, y):\n    return x * {j} + y - {i}\n\n"
                                                     for j in range(12)))
    sets = ["model.dim=32", "model.inter_dim=64", "model.n_layers=2", "model.n_dense_layers=1", "model.n_heads=2",
            "model.kv_lora_rank=16", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
            "model.moe.dim=32", "model.moe.moe_inter_dim=16", "model.moe.n_routed_experts=8",
            "model.moe.n_activated_experts=2", "model.moe.n_expert_groups=2", "model.moe.n_limited_groups=1",
            "data.seq_len=32", "data.vocab_size=300", "schedule.batch_size=4", "schedule.steps=2",
            "routing.uniform_steps=0", "eval.batches=1", "eval.sample_tokens=0", "threads=1", "dtype=fp32",
            f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}"]
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "deepseek_moe.cli.main", "train", "--quiet", "--nproc", "2",
                           "--data", str(corpus), "--out", str(run_dir), *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert len(list((run_dir / "model").glob("model-*-of-00002.safetensors"))) == 2
    out = tmp_path / "hf"
    assert main(["export", "hf", str(run_dir), str(out)]) == 0
    ours, theirs = _tensors(run_dir / "model"), _tensors(out)
    assert sorted(ours) == sorted(theirs)
    for key, t in theirs.items():
        assert ours[key].view(-1).view(torch.uint8).equal(t.view(-1).view(torch.uint8)), key
