"""`deepseek-moe train --nproc 2` (torchrun, gloo) reproduces the one-process run step for step, and its
checkpoints resume on another process count. Bad layouts fail before any process is started."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepseek_moe.train.config import resolve_config
from deepseek_moe.train.loop import run

pytestmark = pytest.mark.slow

SMALL = [
    "model.dim=32", "model.inter_dim=64", "model.n_layers=2", "model.n_dense_layers=1", "model.n_heads=2",
    "model.kv_lora_rank=16", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
    "model.moe.dim=32", "model.moe.moe_inter_dim=16", "model.moe.n_routed_experts=8",
    "model.moe.n_activated_experts=2", "model.moe.n_expert_groups=2", "model.moe.n_limited_groups=1",
    "model.moe.capacity_factor=1.0", "data.seq_len=32", "data.vocab_size=300", "schedule.batch_size=4",
    "schedule.steps=6", "routing.uniform_steps=2", "checkpoint.every=3", "eval.batches=2", "eval.every=3",
    "eval.log_every=1", "eval.sample_tokens=4", "threads=1", "dtype=fp32",
]


def write_corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        (root / f"m{i:02d}.py").write_text("".join(f"def f{i}_{j}(x, y):\n    return x * {j} + y - {i}\n\n"
                                                   for j in range(12)))
    return root


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deepseek_moe.cli.main", "train", "--quiet", *args],
                          capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r.get("loss", r.get("val_loss")) for r in records if r["kind"] in ("train", "val", "summary")]


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb)
    assert la == pytest.approx(lb, abs=2e-5), f"{a.name} {la}\n{b.name} {lb}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], Path]:
    tmp = tmp_path_factory.mktemp("ep_train")
    corpus = write_corpus(tmp / "corpus")
    sets = [*SMALL, f"data.cache_dir={json.dumps(str(tmp / 'cache'))}"]
    one = tmp / "one"
    run(resolve_config(assignments=[*sets, f"data.paths={json.dumps([str(corpus)])}", f"out={json.dumps(str(one))}"]),
        progress=False)
    args = [a for s in sets for a in ("--set", s)] + ["--data", str(corpus)]
    return tmp, args, one


def test_two_processes_reproduce_one(setup: tuple[Path, list[str], Path]) -> None:
    tmp, args, one = setup
    two = tmp / "two"
    done = cli(*args, "--out", str(two), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    assert_same_run(one, two)
    # Dropping summed over both processes: exactly the single process's fraction, step by step.
    one_train, two_train = train_records(one), train_records(two)
    assert [r["dropped"] for r in two_train] == [r["dropped"] for r in one_train]
    assert any(r["dropped"] > 0 for r in one_train)
    # All-to-all traffic over both processes (none on one): M = 1 group, so every token reaches one process.
    assert all("a2a_bytes_per_token" not in r for r in one_train)
    assert all(r["a2a_ranks_per_token"] == 1.0 and r["a2a_bytes_per_token"] > 0 for r in two_train)
    for name in ("model/config.json", "model/tokenizer.json", "routing.json", "sample.txt", "state/step-3/.metadata"):
        assert (two / name).is_file(), name

    # Saved on 2 processes, resumed on 1: the same steps as the uninterrupted run.
    resumed = tmp / "two_then_one"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "state" / "step-6")
    done = cli("--resume", str(resumed))
    assert done.returncode == 0, done.stderr[-4000:]
    assert_same_run(one, resumed)


def test_one_process_checkpoint_resumes_on_two(setup: tuple[Path, list[str], Path]) -> None:
    tmp, _, one = setup
    resumed = tmp / "one_then_two"
    shutil.copytree(one, resumed)
    shutil.rmtree(resumed / "state" / "step-6")
    done = cli("--resume", str(resumed), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    assert_same_run(one, resumed)


@pytest.mark.parametrize(("extra", "message"), [
    (["--nproc", "4", "--ep", "4"], r"n_expert_groups \(2\) must be a multiple of the expert-parallel size \(4 processes\)"),
    (["--nproc", "2", "--ep", "2", "--set", "model.moe.n_expert_groups=4", "--set", "model.moe.n_limited_groups=3"],
     r"n_limited_groups \(3\) must be <= the number of expert-parallel devices \(2\)"),
    (["--nproc", "4", "--ep", "3"], r"expert-parallel size ep \(3\) must be a positive divisor of the number of "
                                    r"processes \(4\)"),
    (["--nproc", "3"], r"schedule.batch_size \(4\) must be a multiple of the number of processes \(3\)"),
    (["--nproc", "2", "--batch-size", "3"], r"schedule.batch_size \(3\) must be a multiple of the number of processes"),
])
def test_bad_layouts_fail_before_launching(setup: tuple[Path, list[str], Path], extra: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from deepseek_moe.cli.main import main

    tmp, args, _ = setup
    assert main(["train", "--quiet", *args, "--out", str(tmp / "bad"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot train on"), err
    assert re.search(message, err), err
    assert not (tmp / "bad").exists()


def test_extend_steps_on_two_processes_matches_one(setup: tuple[Path, list[str], Path]) -> None:
    """--extend-steps under --nproc: every rank runs the same total (rank 0 rewrites config.json meanwhile)."""
    tmp, _, one = setup
    runs = {n: tmp / f"extend_{n}" for n in (1, 2)}
    for n, path in runs.items():
        shutil.copytree(one, path)
        done = cli("--resume", str(path), "--extend-steps", "2", "--nproc", str(n))
        assert done.returncode == 0, done.stderr[-4000:]
        assert json.loads((path / "config.json").read_text())["schedule"]["extra_steps"] == 2
    assert_same_run(runs[1], runs[2])
    assert losses(runs[2])[:len(losses(one)) - 1] == losses(one)[:-1]  # the planned steps, summary aside


def test_mtp_on_two_processes_reproduces_one(setup: tuple[Path, list[str], Path]) -> None:
    """D = 1 multi-token prediction: the MTP module (its own MoE block, sharing embedding and head) sharded by
    FSDP2, its experts split over both processes, checkpointed by DCP and written by the sharded save, gives the
    one-process run's losses (main and MTP) step for step, and the 2-process checkpoint resumes on 1."""
    tmp, args, _ = setup
    runs = {n: tmp / f"mtp_{n}" for n in (1, 2)}
    for n, path in runs.items():
        done = cli(*args, "--mtp-depth", "1", "--out", str(path), "--nproc", str(n))
        assert done.returncode == 0, done.stderr[-4000:]
    assert_same_run(runs[1], runs[2])
    mtp = {n: [r["mtp_loss"] for r in train_records(path)] for n, path in runs.items()}
    assert len(mtp[1]) == 6 and mtp[2] == pytest.approx(mtp[1], abs=2e-5)
    from deepseek_moe.io import load_pretrained

    one, two = (load_pretrained(path / "model").state_dict() for path in runs.values())
    assert any(k.startswith("mtp.0.block.ffn.experts") for k in two) and one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4, msg=k)

    resumed = tmp / "mtp_two_then_one"
    shutil.copytree(runs[2], resumed)
    shutil.rmtree(resumed / "state" / "step-6")
    done = cli("--resume", str(resumed))
    assert done.returncode == 0, done.stderr[-4000:]
    assert_same_run(runs[1], resumed)


def test_adaptive_capacity_and_entropy_on_two_processes_match_one(setup: tuple[Path, list[str], Path]) -> None:
    """The adaptive factor is computed from loads summed over the processes, so two processes move it exactly as
    one does (and drop what one drops); the entropy regulariser is per token, so it too sums to one's."""
    tmp, args, _ = setup
    extra = ["--set", "model.moe.capacity_policy=\"adaptive\"", "--set", "model.moe.capacity_min=0.5",
             "--set", "model.moe.capacity_update_rate=0.5", "--set", "model.moe.entropy_loss_alpha=0.05"]
    runs = {n: tmp / f"adaptive_{n}" for n in (1, 2)}
    for n, out in runs.items():
        done = cli(*args, *extra, "--out", str(out), "--nproc", str(n))
        assert done.returncode == 0, done.stderr[-4000:]
    assert_same_run(runs[1], runs[2])
    one, two = train_records(runs[1]), train_records(runs[2])
    factors = lambda records: [c for r in records for c in r["capacity"]]  # noqa: E731
    assert factors(two) == pytest.approx(factors(one), abs=1e-12)
    assert [r["dropped"] for r in two] == [r["dropped"] for r in one]
    assert len({tuple(r["capacity"]) for r in one}) > 2  # the factor moved
    assert [r.get("routing_entropy") for r in two] == pytest.approx([r.get("routing_entropy") for r in one])
