import dataclasses
import json

import pytest

from deepseek_moe.train.config import (
    DataConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    load_config_file,
    parse_value,
    resolve_config,
)
from deepseek_moe.train.errors import TrainError


def test_defaults_are_valid_frozen_and_keyword_only():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        ScheduleConfig(10)  # type: ignore[misc]


@pytest.mark.parametrize(("make", "field"), [
    (lambda: ScheduleConfig(steps=0), "steps (0)"),
    (lambda: ScheduleConfig(warmup_fraction=1.5), "warmup_fraction (1.5)"),
    (lambda: DataConfig(seq_len=-3), "seq_len (-3)"),
    (lambda: DataConfig(vocab_size=100), "vocab_size (100)"),
    (lambda: TrainConfig(dtype="fp8"), "dtype ('fp8')"),
])
def test_invalid_values_name_field_and_value(make, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_routing_stages_must_fit_in_the_schedule():
    with pytest.raises(ValueError, match="overlap"):
        resolve_config(assignments=["schedule.steps=10", "routing.uniform_steps=6", "routing.finetune_steps=6"])


def test_dict_round_trip_through_json():
    cfg = resolve_config(assignments=["routing.frozen_experts=[1, 3]", "optim.betas=[0.9, 0.99]", "model.n_layers=2"])
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.routing.frozen_experts == (1, 3)


@pytest.mark.parametrize(("text", "value"), [("3e-4", 3e-4), ("true", True), ("[1, 2]", [1, 2]),
                                             ('"x y"', "x y"), ("cpu", "cpu"), ("'single'", "single")])
def test_parse_value(text, value):
    assert parse_value(text) == value


def test_set_any_field_and_model_overrides():
    cfg = resolve_config(assignments=["optim.lr=1e-3", "model.n_layers=3", "model.moe.capacity_factor=1.25",
                                      "model.preset=tiny", "eval.sample_prompt=import "])
    assert cfg.optim.lr == 1e-3
    assert cfg.model.overrides == {"n_layers": 3, "moe": {"capacity_factor": 1.25}}
    assert cfg.eval.sample_prompt == "import "


@pytest.mark.parametrize(("assignment", "name"), [
    ("optim.lrr=1", "optim.lrr"), ("nope=1", "nope"), ("model.n_layerz=2", "model.n_layerz"),
    ("model.moe.n_expertz=2", "model.moe.n_expertz"), ("optim=3", "optim"),
])
def test_unknown_field_is_named(assignment, name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        resolve_config(assignments=[assignment])


def test_bad_assignment_syntax():
    with pytest.raises(ValueError, match="a.b.c=VALUE"):
        apply_overrides({}, ["optim.lr"])


def test_config_files_toml_and_json(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('seed = 3\n[schedule]\nsteps = 50\n[model]\npreset = "tiny"\n[model.overrides]\nn_layers = 2\n')
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"optim": {"lr": 0.01}}))
    cfg = resolve_config(config_file=toml, assignments=["schedule.steps=60"])
    assert (cfg.seed, cfg.schedule.steps, cfg.model.overrides) == (3, 60, {"n_layers": 2})
    assert resolve_config(config_file=js).optim.lr == 0.01


def test_config_file_errors(tmp_path):
    with pytest.raises(TrainError, match="does not exist"):
        load_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[schedule\nsteps=")
    with pytest.raises(TrainError, match="bad.toml"):
        load_config_file(bad)
    unknown = tmp_path / "u.json"
    unknown.write_text(json.dumps({"schedule": {"stepz": 1}}))
    with pytest.raises(ValueError, match=r"schedule\.stepz"):
        resolve_config(config_file=unknown)
