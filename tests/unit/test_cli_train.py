"""``deepseek-moe train`` and ``routes``: bad input gives ``error: ...`` and exit 2, never a traceback."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from deepseek_moe.cli.main import build_parser, main

SMALL = [
    "model.dim=32", "model.inter_dim=64", "model.n_layers=2", "model.n_dense_layers=1", "model.n_heads=2",
    "model.kv_lora_rank=16", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
    "model.moe.dim=32", "model.moe.moe_inter_dim=16", "model.moe.n_routed_experts=8",
    "model.moe.n_activated_experts=2", "data.vocab_size=300", "eval.batches=2", "eval.every=2",
    "eval.sample_tokens=4", "threads=1",
]


def small_args(tmp: Path, *extra: str) -> list[str]:
    corpus = tmp / "corpus"
    if not corpus.exists():
        corpus.mkdir(parents=True)
        for i in range(30):
            (corpus / f"m{i}.py").write_text(f"x_{i} = [{i}, {i + 1}]\nprint(x_{i})\n" * 40)
    args = ["train", "--quiet", "--data", str(corpus), "--steps", "4", "--batch-size", "2", "--seq-len", "16",
            "--set", f"data.cache_dir={tmp / 'cache'}", "--set", "checkpoint.every=2"]
    for item in SMALL:
        args += ["--set", item]
    return args + list(extra)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "run"
    assert main(small_args(tmp, "--out", str(out))) == 0
    return out


def expect_error(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_subcommands_are_registered():
    parser = build_parser()
    args = parser.parse_args(["routes", "somewhere"])
    assert args.command == "routes" and callable(args.func)
    assert parser.parse_args(["train"]).command == "train"


def test_cli_run_uses_flags(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    assert config["schedule"]["steps"] == 4 and config["data"]["seq_len"] == 16
    assert config["resolved_model"]["n_layers"] == 2 and (run_dir / "model" / "tokenizer.json").is_file()


def test_bad_inputs(capsys, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    expect_error(capsys, ["train", "--data", str(tmp_path / "nope.txt")], "nope.txt", "does not exist")
    assert not any((work / "runs").glob("*"))  # the refused run left no empty runs/<timestamp>/
    binary = tmp_path / "x.bin"
    binary.write_bytes(b"\x00\x01binary\x00")
    expect_error(capsys, ["train", "--data", str(binary)], "x.bin", "binary")
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(capsys, ["train", "--data", str(empty)], "no text")
    expect_error(capsys, ["train", "--set", "optim.lrr=0.1"], "optim.lrr")
    expect_error(capsys, ["train", "--set", "model.moe.n_expertz=3"], "model.moe.n_expertz")
    expect_error(capsys, ["train", "--steps", "0"], "steps (0)")
    expect_error(capsys, ["train", "--config", str(tmp_path / "missing.toml")], "missing.toml")
    expect_error(capsys, ["train", "--preset", "huge-imaginary", "--data", str(binary)], "x.bin")
    expect_error(capsys, ["train", "--resume", str(tmp_path)], "not a run directory")
    expect_error(capsys, ["routes", str(tmp_path)], "routing.json")


def test_bad_model_override_and_preset(capsys, tmp_path):
    base = small_args(tmp_path, "--out", str(tmp_path / "r"))
    expect_error(capsys, [*base, "--set", "model.n_dense_layers=5"], "n_dense_layers (5)")
    expect_error(capsys, [*base, "--preset", "nonexistent"], "nonexistent")


def test_existing_run_needs_force(capsys, run_dir, tmp_path):
    expect_error(capsys, small_args(tmp_path, "--out", str(run_dir)), "--force", str(run_dir))


def test_resume_checks_the_checkpoint(capsys, run_dir, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)
    expect_error(capsys, ["train", "--quiet", "--resume", str(copy), "--set", "model.n_layers=3"],
                 "does not match")
    (copy / "state" / "step-4" / "__0_0.distcp").write_bytes(b"not a checkpoint file")
    expect_error(capsys, ["train", "--quiet", "--resume", str(copy), "--extend-steps", "2"], "__0_0.distcp",
                 "corrupt")


def test_resume_refuses_another_plan(capsys, run_dir, tmp_path):
    """Item 12: the lr curve and routing stages are functions of the schedule, so resuming keeps it."""
    from deepseek_moe.train.config import TrainConfig
    from deepseek_moe.train.errors import TrainError
    from deepseek_moe.train.loop import run
    from deepseek_moe.train.rundir import read_run_config

    copy = tmp_path / "other"
    subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)
    before = (copy / "metrics.jsonl").read_text()
    expect_error(capsys, ["train", "--quiet", "--resume", str(copy), "--steps", "6"], "schedule.steps = 6",
                 "planned with 4", "--extend-steps")
    expect_error(capsys, ["train", "--quiet", "--resume", str(copy), "--set", "routing.uniform_steps=1"],
                 "routing.uniform_steps = 1")
    expect_error(capsys, ["train", "--quiet", "--resume", str(copy), "--nproc", "2", "--steps", "8"],
                 "schedule.steps = 8")
    expect_error(capsys, [*small_args(tmp_path, "--out", str(tmp_path / "new")), "--extend-steps", "2"],
                 "--extend-steps", "--resume")
    cfg = TrainConfig.from_dict(read_run_config(copy))
    with pytest.raises(TrainError, match="schedule.steps"):
        run(cfg.replace(schedule=dataclasses.replace(cfg.schedule, steps=6), out=str(copy)), resume=True,
            progress=False)
    assert (copy / "metrics.jsonl").read_text() == before and not (copy / "state" / "step-6").exists()


def test_extend_steps_continues_at_the_final_lr(run_dir, tmp_path):
    copy = tmp_path / "more"
    subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)
    read = lambda: [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    planned = [r for r in read() if r["kind"] != "summary"]
    assert main(["train", "--quiet", "--resume", str(copy), "--extend-steps", "2", "--set", "eval.log_every=1"]) == 0
    records = read()
    assert [r for r in records if r["kind"] != "summary" and r["step"] <= 4] == planned
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4, 6]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    config = json.loads((copy / "config.json").read_text())
    final_lr = config["optim"]["lr"] * config["schedule"]["min_lr_ratio"]
    assert train[5]["lr"] == pytest.approx(final_lr) and train[6]["lr"] == pytest.approx(final_lr)
    assert train[5]["stage"] == train[6]["stage"] == train[4]["stage"] == 2
    assert config["schedule"]["steps"] == 4 and config["schedule"]["extra_steps"] == 2
    assert records[-1]["kind"] == "summary" and records[-1]["step"] == 6 and (copy / "state" / "step-6").is_dir()
    assert main(["train", "--quiet", "--resume", str(copy), "--extend-steps", "1"]) == 0  # extensions add up
    assert json.loads((copy / "config.json").read_text())["schedule"]["extra_steps"] == 3


def test_routes(capsys, run_dir, tmp_path):
    heatmap = tmp_path / "h.png"
    assert main(["routes", str(run_dir), "--out", str(heatmap)]) == 0
    out = capsys.readouterr().out
    assert "layers.1.ffn" in out and "max/mean" in out and heatmap.is_file()


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "deepseek_moe.train", "--set", "schedule.nope=1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "schedule.nope" in proc.stderr and "Traceback" not in proc.stderr


def test_val_data_is_the_validation_split(tmp_path):
    """Item 13: --val-data validates on that text alone, trains on every --data document, and is recorded."""
    val = tmp_path / "held_out"
    val.mkdir()
    (val / "v.py").write_text("def held_out(a, b):\n    return [a, b] * 3\n" * 30)
    out = tmp_path / "run"
    assert main([*small_args(tmp_path, "--out", str(out)), "--val-data", str(val), "--steps", "2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["val_paths"] == [str(val)]
    corpus = config["corpus"]
    assert corpus["val_source"] == str(val) and corpus["n_val_documents"] == 1
    assert corpus["n_train_documents"] == 30 and corpus["val_chars"] == len((val / "v.py").read_text())
