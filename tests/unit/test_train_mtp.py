"""Training with multi-token prediction: the λ schedule (V3's 0.3 then 0.1, configurable, validated), the MTP
loss logged apart, the modules saved with the model, exact resume, and the CLI flag."""

import json
import shutil

import pytest
from test_train_loop import small_config

from deepseek_moe.io import load_pretrained
from deepseek_moe.train.checkpoint import read_model_state
from deepseek_moe.train.config import ScheduleConfig, resolve_config
from deepseek_moe.train.loop import run


def test_lambda_schedule_defaults_to_v3_and_switches_at_its_fraction() -> None:
    s = ScheduleConfig(steps=148)
    assert s.mtp_lambda == ((0.0, 0.3), (10 / 14.8, 0.1))
    assert [s.mtp_lambda_at(i) for i in (0, 99, 100, 147, 500)] == [0.3, 0.3, 0.1, 0.1, 0.1]  # 10/14.8*148 = 100
    three = ScheduleConfig(steps=10, mtp_lambda=((0, 1.0), (0.2, 0.5), (0.5, 0)))
    assert [three.mtp_lambda_at(i) for i in range(10)] == [1.0, 1.0, 0.5, 0.5, 0.5, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("value", [[], [[0.1, 0.3]], [[0, 0.3], [0, 0.1]], [[0, 0.3], [0.6, 0.1], [0.5, 0.2]],
                                   [[0, -0.1]], [[0, 0.3], [1.5, 0.1]], [[0, float("nan")]], [[0, float("inf")]],
                                   [[0, 0.3, 1]], "0.3", [[0, True]]])
def test_bad_lambda_schedules_name_the_field(value: object) -> None:
    with pytest.raises(ValueError, match=r"schedule\.mtp_lambda .* must be a list of \[start, lambda\] pairs"):
        resolve_config(assignments=[f"schedule.mtp_lambda={json.dumps(value)}"])


def test_lambda_schedule_reads_back_from_json_and_toml_lists() -> None:
    cfg = resolve_config(assignments=["schedule.mtp_lambda=[[0, 0.3], [0.5, 0.1]]"])
    assert cfg.schedule.mtp_lambda == ((0.0, 0.3), (0.5, 0.1))
    assert resolve_config(base=cfg.to_dict()).schedule == cfg.schedule


def test_cli_flag_sets_the_depth() -> None:
    import argparse

    from deepseek_moe.train.command import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = build_config(parser.parse_args(["--mtp-depth", "1"]))
    assert cfg.model.overrides["mtp_depth"] == 1


MTP = ["model.mtp_depth=1", "schedule.steps=6", "schedule.mtp_lambda=[[0, 0.3], [0.5, 0.1]]", "checkpoint.every=3",
       "routing.uniform_steps=1"]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_trains_logs_saves_and_resumes_the_mtp_module(tmp_path) -> None:
    ref = run(small_config(tmp_path, *MTP, out="ref"), progress=False)
    train = [r for r in _records(ref.run_dir) if r["kind"] == "train"]
    assert [r["mtp_lambda"] for r in train] == [0.3, 0.3, 0.3, 0.1, 0.1, 0.1]
    assert all(r["mtp_loss"] > 0 and r["loss"] == r["ce_loss"] + r["aux_loss"] for r in train)
    assert train[-1]["mtp_loss"] < train[0]["mtp_loss"]  # it learns
    state = read_model_state(ref.run_dir / "state/step-6")
    assert any(k.startswith("mtp.0.eh_proj") for k in state)
    model = load_pretrained(ref.run_dir / "model")
    assert model.config.mtp_depth == 1
    saved = model.state_dict()
    assert all((saved[k] == v).all() for k, v in state.items() if k in saved) and saved.keys() <= state.keys()

    # Resumed from step 3 (before λ switches): the same steps as the uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(ref.run_dir, resumed)
    shutil.rmtree(resumed / "state" / "step-6")
    shutil.rmtree(resumed / "model")
    again = run(small_config(tmp_path, *MTP, out="resumed"), resume=True, progress=False)
    assert again.val_loss == ref.val_loss
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "wall_s", "resumed_from")}  # noqa: E731
                        for r in rs]
    assert strip(_records(resumed)) == strip(_records(ref.run_dir))
