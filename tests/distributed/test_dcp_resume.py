"""Sharded (DCP) checkpoints reshard: a run saved on 2 processes resumes on 4, saved there resumes on 1, and every
loss equals the uninterrupted one-process run's within 1e-5; a save killed midway leaves the previous checkpoint
to resume from. The N-process legs run the Trainer with the default strategy under gloo."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from deepseek_moe.parallel.dcp import read_full
from deepseek_moe.train.checkpoint import read_model_state, step_dirs
from deepseek_moe.train.config import resolve_config
from deepseek_moe.train.loop import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dcp_workers import leg, resave  # noqa: E402
from harness import RanksFailed, run_ranks  # noqa: E402
from test_train_distributed import write_corpus  # noqa: E402

# Routing state that must carry over exactly: uniform-routing draws across the 2 -> 4 boundary (steps 1-3), the
# routing bias with its counts, and capacity drops with their protected-sequence draws.
ASSIGN = [
    "model.dim=32", "model.inter_dim=64", "model.n_layers=2", "model.n_dense_layers=1", "model.n_heads=2",
    "model.kv_lora_rank=16", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
    "model.moe.dim=32", "model.moe.moe_inter_dim=16", "model.moe.n_routed_experts=8",
    "model.moe.n_activated_experts=2", "model.moe.n_expert_groups=4", "model.moe.n_limited_groups=2",
    "model.moe.capacity_factor=1.0", "model.moe.use_routing_bias=true", "model.moe.score_func=sigmoid",
    "data.seq_len=32", "data.vocab_size=300", "schedule.batch_size=4", "schedule.steps=6",
    "routing.uniform_steps=3", "checkpoint.keep_last=10", "eval.batches=1", "eval.sample_tokens=0", "threads=1",
    "dtype=fp32",
]


# One validation batch of batch_size sequences: every process count splits it evenly, so the validation losses
# compare too. (A batch the processes cannot split is evaluated whole by each, with other uniform-routing draws
# than one process makes; the trainer restores the routing generators after evaluating, so training is unmoved.)
TOLERANCE = 1e-5


def assignments(tmp: Path, out: Path) -> list[str]:
    return [*ASSIGN, f"data.paths={json.dumps([str(tmp / 'corpus')])}",
            f"data.cache_dir={json.dumps(str(tmp / 'cache'))}", f"out={json.dumps(str(out))}"]


def log(out: Path) -> Path:
    return out.with_suffix(".jsonl")  # beside the run directory: a new run wants none there


def records(log: Path) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in map(json.loads, log.read_text().splitlines())}


def run_leg(world: int, tmp: Path, out: Path, saves: list[int], *, resume: bool, kill_at: int = 0) -> None:
    run_ranks(world, "train_leg", module="dcp_workers", timeout_s=300, grace_s=15, extra_env={
        "DSMOE_ASSIGN": json.dumps(assignments(tmp, out)), "DSMOE_RESUME": "1" if resume else "0",
        "DSMOE_SAVE_AT": ",".join(map(str, saves)), "DSMOE_KILL_AT": str(kill_at), "DSMOE_LOG": str(log(out)),
        "DSMOE_RESAVE": str(out / "resaved") if resume else ""})


def one_process(tmp: Path, out: Path, saves: list[int], *, resume: bool) -> Trainer:
    trainer = Trainer(resolve_config(assignments=assignments(tmp, out)), resume=resume, progress=False)
    trainer.setup()
    if resume:
        resave(trainer, out / "resaved")
    leg(trainer, saves, log(out))
    return trainer


def assert_lossless(out: Path, step: int) -> None:
    """The state restored on another process count, saved again before any step, is the checkpoint it came from,
    bit for bit: model, optimizer moments and steps, generator and routing state, trainer.json."""
    saved, again = out / "state" / f"step-{step}", out / "resaved" / f"step-{step}"
    for top in ("model", "optimizer", "extra"):
        a, b = read_full(saved, top), read_full(again, top)
        assert a.keys() == b.keys(), top
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (top, k)
    assert json.loads((saved / "trainer.json").read_text()) == json.loads((again / "trainer.json").read_text())
    shutil.rmtree(out / "resaved")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, Any]]]:
    """The uninterrupted run on one process, checkpointing (and validating) at steps 2, 4 and 6."""
    tmp = tmp_path_factory.mktemp("dcp")
    write_corpus(tmp / "corpus")
    out = tmp / "reference"
    one_process(tmp, out, [2, 4, 6], resume=False)
    return tmp, records(log(out))


def assert_same(got: dict[int, dict[str, Any]], want: dict[int, dict[str, Any]]) -> None:
    assert sorted(got) == sorted(want)
    for step, r in want.items():
        assert got[step].keys() == r.keys(), step
        for k in r:
            if k != "step":
                assert got[step][k] == pytest.approx(r[k], abs=TOLERANCE), (step, k, got[step][k], r[k])


def test_resume_on_2_then_4_then_1_processes(reference: tuple[Path, dict[int, dict[str, Any]]]) -> None:
    tmp, want = reference
    out = tmp / "resharded"
    run_leg(2, tmp, out, [2], resume=False)  # steps 1-2 on 2 processes
    assert sorted(p.name for p in (out / "state" / "step-2").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.json"]
    run_leg(4, tmp, out, [4], resume=True)  # steps 3-4 on 4
    assert_lossless(out, 2)
    assert len(list((out / "state" / "step-4").glob("*.distcp"))) == 4
    one_process(tmp, out, [6], resume=True)  # steps 5-6 on 1
    assert_lossless(out, 4)
    assert_same(records(log(out)), want)
    # and the weights themselves, read back whole from the three-process-count history
    got, ref = read_model_state(out / "state" / "step-6"), read_model_state(tmp / "reference" / "state" / "step-6")
    assert got.keys() == ref.keys()
    for k in ref:
        assert (got[k] - ref[k]).abs().max() <= 1e-5, k


def test_a_save_killed_midway_leaves_the_previous_checkpoint(
        reference: tuple[Path, dict[int, dict[str, Any]]]) -> None:
    tmp, want = reference
    out = tmp / "killed"
    with pytest.raises(RanksFailed) as failed:
        run_leg(2, tmp, out, [2, 4], resume=False, kill_at=4)  # rank 0 SIGKILLs itself inside step 4's save
    assert failed.value.codes[0] == -9, failed.value
    state = out / "state"
    assert [p.name for p in step_dirs(state)] == ["step-2"]
    partial = state / ".tmp-step-4"
    assert (partial / "__0_0.distcp").is_file() and not (partial / ".metadata").exists()

    trainer = one_process(tmp, out, [4, 6], resume=True)  # from step 2, on one process
    assert trainer.start == 2
    assert not partial.exists() and [p.name for p in step_dirs(state)] == ["step-2", "step-4", "step-6"]
    got = records(log(out))  # steps 3 and 4 twice: before the kill and after the resume
    assert_same(got, want)
    shutil.rmtree(out)
