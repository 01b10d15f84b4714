"""End-to-end runs of a very small model on a small synthetic corpus (seconds each)."""

import io
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deepseek_moe.train.checkpoint import read_model_state
from deepseek_moe.train.config import resolve_config
from deepseek_moe.train.errors import TrainError
from deepseek_moe.train.loop import run

SMALL = [
    "model.dim=32", "model.inter_dim=64", "model.n_layers=2", "model.n_dense_layers=1", "model.n_heads=2",
    "model.kv_lora_rank=16", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
    "model.moe.dim=32", "model.moe.moe_inter_dim=16", "model.moe.n_routed_experts=8",
    "model.moe.n_activated_experts=2", "data.seq_len=32", "data.vocab_size=300", "schedule.batch_size=4",
    "eval.batches=2", "eval.every=4", "eval.log_every=1", "eval.sample_tokens=8", "threads=1", "dtype=fp32",
]


def write_corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        body = "".join(f"def f{i}_{j}(x, y):\n    return x * {j} + y - {i}\n\n" for j in range(12))
        (root / f"m{i:02d}.py").write_text(body)
    return root


def small_config(tmp_path: Path, *extra: str, out: str = "run"):
    data = write_corpus(tmp_path / "corpus")
    return resolve_config(assignments=[*SMALL, f"data.paths={json.dumps([str(data)])}",
                                       f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
                                       f"out={json.dumps(str(tmp_path / out))}", *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = small_config(tmp, "schedule.steps=8", "routing.uniform_steps=2", "checkpoint.every=4")
    return cfg, run(cfg, progress=False)


def test_run_writes_the_whole_run_directory(finished_run):
    cfg, result = finished_run
    d = result.run_dir
    for name in ("config.json", "metrics.jsonl", "loss.png", "routing_heatmap.png", "sample.txt", "routing.json",
                 "model/config.json", "model/tokenizer.json", "state/step-4/trainer.json", "state/step-8/.metadata"):
        assert (d / name).is_file(), name
    assert list((d / "model").glob("*.safetensors"))
    config = json.loads((d / "config.json").read_text())
    assert config["corpus"]["sha256"] and config["tokenizer"]["sha256"]
    assert config["resolved_model"]["vocab_size"] == config["tokenizer"]["vocab_size"] <= 300
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["stage"] for r in train] == [1, 1] + [2] * 6
    assert train[0]["imbalance"] >= 1.0 and "dropped" in train[0]
    assert [r["step"] for r in records if r["kind"] == "val"] == [4, 8]
    assert records[-1]["kind"] == "summary" and records[-1]["val_loss"] == result.val_loss
    assert result.val_loss < records[0]["ce_loss"]


def test_existing_run_dir_needs_force(finished_run, tmp_path):
    cfg, _ = finished_run
    with pytest.raises(TrainError, match="--force"):
        run(cfg, progress=False)


KILLER = textwrap.dedent("""
    import json, os, signal, sys
    from deepseek_moe.train import data
    from deepseek_moe.train.config import resolve_config
    from deepseek_moe.train.loop import run

    original, calls = data.PackedSequences.next_batch, [0]

    def next_batch(self, n):
        calls[0] += 1
        if calls[0] == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # mid-step, between checkpoints
        return original(self, n)

    data.PackedSequences.next_batch = next_batch
    run(resolve_config(assignments=json.loads(sys.argv[1])), progress=False)
""")


def _comparable(records):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "wall_s", "resumed_from")} for r in records]


def test_sigkilled_run_resumes_to_the_same_loss(tmp_path):
    # adaptive capacity and the entropy regulariser: their state (the factors, pending loads, the schedule)
    # must come back exactly too; the metrics compared below log the factors step by step.
    extra = ["schedule.steps=10", "schedule.grad_accum_steps=2", "routing.uniform_steps=2", "checkpoint.every=3",
             "model.moe.use_routing_bias=true", "model.moe.score_func=sigmoid", "model.moe.capacity_factor=1.0",
             "model.moe.capacity_policy=\"adaptive\"", "model.moe.capacity_min=0.5",
             "model.moe.capacity_update_rate=0.5", "model.moe.entropy_loss_alpha=0.05"]
    ref = run(small_config(tmp_path, *extra, out="ref"), progress=False)

    cfg = small_config(tmp_path, *extra, out="killed")
    assignments = [*SMALL, *extra, f"data.paths={json.dumps(list(cfg.data.paths))}",
                   f"data.cache_dir={json.dumps(cfg.data.cache_dir)}", f"out={json.dumps(cfg.out)}"]
    # Micro-batch 15 is the first of step 8: steps 1-7 are done, the last checkpoint is step 6.
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(assignments), "15"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    run_dir = Path(cfg.out)
    assert [p.name for p in sorted((run_dir / "state").iterdir()) if p.name.startswith("step-")] == ["step-3",
                                                                                                  "step-6"]
    assert not (run_dir / "model").exists()

    resumed = run(cfg, resume=True, progress=False)
    assert resumed.val_loss == ref.val_loss
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert _comparable(read(run_dir)) == _comparable(read(ref.run_dir))
    capacities = [r["capacity"] for r in read(ref.run_dir) if r["kind"] == "train"]
    assert len({tuple(c) for c in capacities}) > 2, capacities  # the factor did move
    a = read_model_state(run_dir / "state/step-10")
    b = read_model_state(ref.run_dir / "state/step-10")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_stage_three_keeps_frozen_experts_fixed(tmp_path):
    cfg = small_config(tmp_path, "schedule.steps=6", "routing.uniform_steps=1", "routing.finetune_steps=2",
                       "routing.frozen_experts=[0, 5]", "routing.orthogonal_init=true", "checkpoint.every=2")
    result = run(cfg, progress=False)
    before = read_model_state(result.run_dir / "state/step-4")
    after = read_model_state(result.run_dir / "state/step-6")
    for w in ("w1", "w2", "w3"):
        key = f"layers.1.ffn.experts.{w}"
        assert (before[key][[0, 5]] == after[key][[0, 5]]).all()
        assert not (before[key][[1, 2]] == after[key][[1, 2]]).all()
    stages = [json.loads(x)["stage"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "train"]
    assert stages == [1, 2, 2, 2, 3, 3]


class _Payload:
    """Unpickling this creates the marker file: proof that loading ran code from the run directory."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> None:
    """The format the file's reader would take: DCP reads .metadata with pickle, tensor files with torch.load."""
    if path.name == ".metadata":
        path.write_bytes(pickle.dumps(_Payload(marker)))
        return
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    path.write_bytes(buffer.getvalue())


def _resume_exit(run_dir: Path, capsys) -> tuple[int, str]:
    from deepseek_moe.cli.main import main

    code = main(["train", "--quiet", "--resume", str(run_dir)])
    return code, capsys.readouterr().err


def test_resume_unpickles_nothing_from_the_run_directory(finished_run, tmp_path, capsys):
    """Item 11: a malicious pickle in any state file is refused with an error naming the file, never run."""
    import shutil

    _, result = finished_run
    names = sorted(p.name for p in (result.run_dir / "state" / "step-8").iterdir())
    assert names, "the run wrote no state"
    for name in [*names, "../../config.json"]:
        run_dir = tmp_path / f"planted-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(result.run_dir, run_dir)
        target = (run_dir / "state" / "step-8" / name).resolve()
        marker = tmp_path / f"ran-{target.name}"
        _plant(target, marker)
        code, err = _resume_exit(run_dir, capsys)
        assert not marker.exists(), f"loading {name} ran planted code"
        assert code == 2 and target.name in err, (name, err)


def test_pickled_checkpoints_of_earlier_versions_are_refused(finished_run, tmp_path, capsys):
    import shutil

    _, result = finished_run
    run_dir = tmp_path / "old"
    shutil.copytree(result.run_dir, run_dir)
    step = run_dir / "state" / "step-8"
    info = json.loads((step / "trainer.json").read_text())
    for p in step.iterdir():
        if p.name != "__0_0.distcp":
            p.unlink()
    # The layout before format 2: step, data and fingerprint in trainer.json, the rest pickled.
    (step / "trainer.json").write_text(json.dumps({"step": info["step"], "data": info["data"], "fingerprint": {}}))
    marker = tmp_path / "ran"
    for name in ("optimizer.pt", "rng.pt"):
        _plant(step / name, marker)
    code, err = _resume_exit(run_dir, capsys)
    assert not marker.exists()
    assert code == 2 and "pickle" in err and "optimizer.pt" in err, err


def test_format_2_checkpoints_still_resume_on_one_process(finished_run, tmp_path):
    """The safetensors step directories written before DCP checkpoints: the run goes on as if uninterrupted."""
    import shutil

    from safetensors.torch import save_file

    from deepseek_moe.moe.all_layers import routing_state
    from deepseek_moe.train import state_codec
    from deepseek_moe.train.checkpoint import rng_state
    from deepseek_moe.train.loop import Trainer

    cfg, result = finished_run
    run_dir = tmp_path / "format2"
    shutil.copytree(result.run_dir, run_dir)
    shutil.rmtree(run_dir / "state" / "step-8")
    trainer = Trainer(cfg.replace(out=str(run_dir)), resume=True, progress=False)
    trainer.setup()  # restores step 4 (format 3), then rewrite it as format 2 wrote it
    step = run_dir / "state" / "step-4"
    info = json.loads((step / "trainer.json").read_text())
    shutil.rmtree(step)
    step.mkdir()
    model_state = trainer.model.state_dict()
    save_file({k: v.clone() for k, v in model_state.items()}, str(step / "model.safetensors"))
    optimizer_tensors, optimizer_layout = state_codec.encode(trainer.optimizer.state_dict())
    save_file(optimizer_tensors, str(step / "optimizer.safetensors"))
    rng_tensors, rng_layout = state_codec.encode({"global": rng_state(), "routing": routing_state(trainer.model)})
    save_file(rng_tensors, str(step / "rng.safetensors"))
    (step / "trainer.json").write_text(json.dumps({
        "format": 2, "step": 4, "data": info["data"], "scheduler": info["scheduler"], "optimizer": optimizer_layout,
        "rng": rng_layout, "fingerprint": {k: list(v.shape) for k, v in model_state.items()}}))

    resumed = run(cfg.replace(out=str(run_dir)), resume=True, progress=False)
    assert resumed.val_loss == result.val_loss
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert _comparable(read(run_dir)) == _comparable(read(result.run_dir))
    assert sorted(p.name for p in (run_dir / "state" / "step-8").iterdir()) == [".metadata", "__0_0.distcp",
                                                                             "trainer.json"]


def test_a_config_transformers_lacks_still_loads_back(tmp_path, capsys):
    """Softmax scores with the routing bias: model/ is written in our own format, and from_pretrained reads it
    back with the weights of the final checkpoint."""
    import deepseek_moe

    cfg = small_config(tmp_path, "schedule.steps=2", "routing.uniform_steps=0", "model.moe.use_routing_bias=true",
                       "eval.sample_tokens=0")
    result = run(cfg, progress=True)
    assert "own format" in capsys.readouterr().out
    model = deepseek_moe.from_pretrained(result.run_dir / "model")
    saved = read_model_state(result.run_dir / "state/step-2")
    state = model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)


def test_trainer_parts_can_be_driven_one_by_one(tmp_path):
    """The Trainer's pieces are usable alone: a custom loop can call setup, step, evaluate and save."""
    from deepseek_moe.train.checkpoint import step_dirs
    from deepseek_moe.train.loop import Trainer
    from deepseek_moe.train.strategy import SingleProcess

    trainer = Trainer(small_config(tmp_path, "schedule.steps=4", "routing.uniform_steps=1"), progress=False)
    trainer.setup()
    assert isinstance(trainer.strategy, SingleProcess) and trainer.train_model is trainer.model
    first, second = trainer.step(0), trainer.step(1)
    assert (first.step, first.stage, second.stage) == (1, 1, 2)
    assert first.counts is not None and first.counts.shape == (1, 8) and first.lr > second.lr  # cosine, no warm-up
    loss, counts = trainer.evaluate(trainer.val_batches)
    assert 0 < loss < first.ce_loss + 1 and counts is not None
    trainer.save(2)
    assert [p.name for p in step_dirs(trainer.state_dir)] == ["step-2"]


def test_evaluating_does_not_change_the_routes_training_draws(tmp_path):
    """Under uniform routing evaluation draws routes; training's next draws must not depend on it (nor, on N
    processes, on how a validation batch splits), so a step after an evaluation equals one without."""
    from deepseek_moe.train.loop import Trainer

    def two_steps(evaluate: bool, out: str) -> list[float]:
        trainer = Trainer(small_config(tmp_path, "schedule.steps=4", "routing.uniform_steps=4", out=out),
                          progress=False)
        trainer.setup()
        first = trainer.step(0)
        assert first.stage == 1
        if evaluate:
            trainer.evaluate(trainer.val_batches)
        return [first.ce_loss, trainer.step(1).ce_loss]

    plain, evaluated = two_steps(False, "plain"), two_steps(True, "evaluated")
    assert evaluated == plain
