"""``deepseek-moe export hf RUN_DIR OUT [--step N]``: the Hugging Face checkpoint of a training run's step.

A tiny run checkpoints steps 2 and 4; exporting the latest step must give the run's own model/ (written at its
end from the same weights) tensor for tensor, byte for byte; exporting step 2 must give step 2's weights, which
differ; a missing step and a directory that is not a run fail with a message naming them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import deepseek_moe
from deepseek_moe.cli.main import main
from deepseek_moe.train.checkpoint import read_model_state
from deepseek_moe.train.config import resolve_config
from deepseek_moe.train.loop import run

TINY = ["model.dim=32", "model.inter_dim=64", "model.n_layers=2", "model.n_dense_layers=1", "model.n_heads=2",
        "model.kv_lora_rank=16", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
        "model.moe.dim=32", "model.moe.moe_inter_dim=16", "model.moe.n_routed_experts=8",
        "model.moe.n_activated_experts=2", "data.seq_len=32", "data.vocab_size=300", "schedule.batch_size=4",
        "eval.batches=2", "eval.every=4", "eval.sample_tokens=0", "threads=1", "dtype=fp32",
        "schedule.steps=4", "routing.uniform_steps=0", "checkpoint.every=2", "checkpoint.keep_last=3"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118  (safe_open is not a mapping)
                out[key] = st.get_tensor(key)
    return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("export_hf")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"m{i:02d}.py").write_text("".join(f"def f{i}_{j}(x, y):\n    return x * {j} + y - {i}\n\n"
                                                     for j in range(12)))
    cfg = resolve_config(assignments=[*TINY, f"data.paths={json.dumps([str(corpus)])}",
                                      f"data.cache_dir={json.dumps(str(tmp / 'cache'))}",
                                      f"out={json.dumps(str(tmp / 'run'))}"])
    return run(cfg, progress=False).run_dir


def test_latest_step_is_the_runs_model(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hf"
    assert main(["export", "hf", str(run_dir), str(out)]) == 0
    assert "step 4" in capsys.readouterr().out
    ours, theirs = _tensors(out), _tensors(run_dir / "model")
    assert sorted(ours) == sorted(theirs)
    assert all(_bytes(ours[k]) == _bytes(theirs[k]) for k in theirs)
    assert json.loads((out / "config.json").read_text()) == json.loads((run_dir / "model" / "config.json").read_text())
    assert (out / "tokenizer.json").read_text() == (run_dir / "model" / "tokenizer.json").read_text()
    deepseek_moe.from_pretrained(out)  # what generate/serve read


def test_an_earlier_step_has_that_steps_weights(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf2"
    assert main(["export", "hf", str(run_dir), str(out), "--step", "2"]) == 0
    model = deepseek_moe.from_pretrained(out, dtype="float32")
    want = read_model_state(run_dir / "state" / "step-2")  # the DCP files, read on one process
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    final = _tensors(run_dir / "model")
    assert any(not torch.equal(t, final[k]) for k, t in _tensors(out).items())  # step 2 is not step 4


def test_errors_name_the_problem(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "hf", str(run_dir), str(tmp_path / "a"), "--step", "3"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint of step 3" in err and "2, 4" in err
    assert main(["export", "hf", str(tmp_path), str(tmp_path / "b")]) == 2
    assert "is not a run directory (no config.json)" in capsys.readouterr().err
    assert main(["export", "hf", str(run_dir / "model"), str(tmp_path / "c")]) == 2
    assert "resolved_model" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    assert main(["export", "hf", str(run_dir), str(taken)]) == 2
    assert "already exists" in capsys.readouterr().err
