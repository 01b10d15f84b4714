"""The run directory: creating it (never over an existing run without ``force``), config.json, metrics.jsonl.

    RUN_DIR/config.json      the resolved TrainConfig, the model config and the corpus (hashes included)
    RUN_DIR/metrics.jsonl    one JSON record per line: kind "train", "val" or "summary"
    RUN_DIR/routing.json     per-layer expert counts from the latest validation pass
    RUN_DIR/state/step-N/    resumable state (see checkpoint.py)
    RUN_DIR/model/           Hugging Face checkpoint with tokenizer.json
    RUN_DIR/loss.png, routing_heatmap.png, sample.txt
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepseek_moe.train.errors import TrainError

if TYPE_CHECKING:
    from deepseek_moe.train.config import TrainConfig

# Keys config.json holds beyond TrainConfig's own fields: recorded, never read back as settings.
RUN_ONLY_KEYS = ("resolved_model", "precision", "corpus", "tokenizer")


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def prepare_run_dir(path: Path, *, resume: bool, force: bool) -> None:
    if resume:
        if not (path / "config.json").is_file():
            raise TrainError(f"cannot resume {str(path)!r}: it is not a run directory (no config.json)")
        return
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not force:
            raise TrainError(f"run directory {str(path)!r} already exists; pass --force to overwrite it or "
                             f"--resume {path} to continue it")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    path.mkdir(parents=True, exist_ok=True)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """A run's config.json without the run-only keys, ready for ``TrainConfig.from_dict``."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise TrainError(f"{str(run_dir)!r} is not a run directory (no config.json)")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:  # not JSON, or not even UTF-8 text
        raise TrainError(f"{path} is corrupt: {e}") from e
    if not isinstance(data, dict):
        raise TrainError(f"{path} is corrupt: it holds no table of config fields")
    return {k: v for k, v in data.items() if k not in RUN_ONLY_KEYS}


def check_same_plan(run_dir: str | Path, cfg: TrainConfig) -> None:
    """Resuming keeps the run's plan: the learning-rate curve and the routing stages are functions of the
    ``schedule`` and ``routing`` settings, so those must be the ones the run recorded. Only
    ``schedule.extra_steps`` may grow (``--extend-steps``)."""
    from deepseek_moe.train.config import TrainConfig

    try:
        was = TrainConfig.from_dict(read_run_config(run_dir)).to_dict()
    except ValueError as e:  # TrainError included
        raise TrainError(f"cannot resume {str(run_dir)!r}: its config.json is not a valid config: {e}") from e
    now = cfg.to_dict()
    for section in ("schedule", "routing"):
        for key, value in now[section].items():
            old = was[section][key]
            if key == "extra_steps":
                if value < old:
                    raise TrainError(f"cannot resume {str(run_dir)!r} with schedule.extra_steps ({value}) below "
                                     f"the run's ({old}): steps already planned stay planned")
            elif value != old:
                extend = ("; to train past its end, resume with --extend-steps N (N more steps at the final "
                          "learning rate, in the last routing stage)" if key == "steps" else "")
                raise TrainError(f"cannot resume {str(run_dir)!r} with {section}.{key} = {value!r}: the run was "
                                 f"planned with {old!r}, and its learning-rate curve and routing stages follow "
                                 f"that plan{extend}; to change the plan, start a new run")


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


class MetricsLog:
    """Appends records to metrics.jsonl; on resume, drops records past the checkpoint's step first."""

    def __init__(self, path: Path, *, keep_through_step: int | None = None) -> None:
        self.path = path
        if keep_through_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and _record_step(line) <= keep_through_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif keep_through_step is None:
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _record_step(line: str) -> float:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return float("inf")  # a line cut by the kill: drop it
    return float("inf") if record.get("kind") == "summary" else record.get("step", float("inf"))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise TrainError(f"{str(run_dir)!r} has no metrics.jsonl: is it a training run directory?")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


__all__ = ["MetricsLog", "RUN_ONLY_KEYS", "check_same_plan", "default_run_dir", "prepare_run_dir", "read_metrics",
           "read_run_config", "write_json"]
