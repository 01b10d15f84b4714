"""``export_step``: the Hugging Face checkpoint of any checkpoint step of a training run, on one process.

    export_step(RUN_DIR, OUT, step=None)   RUN_DIR/state/step-N/ (the latest when ``step`` is None) -> OUT

The model is rebuilt from the run's config.json (``resolved_model``: the exact ModelConfig it trained), filled
with the step's weights (``train.checkpoint.read_model_state``: DCP's sharded files, whatever process count wrote
them, or format 2, read by this one process), and written by ``save_pretrained``: the same files ``train`` writes to ``RUN_DIR/model/`` at its end,
so ``OUT`` is what generate, serve, info and export onnx read. The tokenizer is the run's (``model/tokenizer.json``,
else the tokenizer cache the run used, checked against the hash config.json recorded).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deepseek_moe.train.checkpoint import read_model_state, step_dirs
from deepseek_moe.train.errors import TrainError

if TYPE_CHECKING:
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

STATE_DIR = "state"


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise TrainError(f"{str(run_dir)!r} is not a run directory (no such directory)")
    if not path.is_file():
        raise TrainError(f"{str(run_dir)!r} is not a run directory (no config.json)")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise TrainError(f"{path} is corrupt: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("resolved_model"), dict):
        raise TrainError(f"{path} has no 'resolved_model' (the model config a training run records): is "
                         f"{str(run_dir)!r} a training run directory? A checkpoint directory needs no export")
    return config


def find_step(run_dir: str | os.PathLike[str], step: int | None = None) -> Path:
    """``RUN_DIR/state/step-N`` for ``step`` (None: the latest); errors list the steps there are."""
    run_dir = Path(run_dir)
    _run_config(run_dir)
    saved = step_dirs(run_dir / STATE_DIR)
    if not saved:
        raise TrainError(f"{str(run_dir)!r} has no checkpoint yet (nothing complete in {run_dir / STATE_DIR}); "
                         "checkpoints are written every checkpoint.every steps and at the end")
    if step is None:
        return saved[-1]
    for path in saved:
        if path.name == f"step-{step}":
            return path
    have = ", ".join(p.name.removeprefix("step-") for p in saved)
    raise TrainError(f"{str(run_dir)!r} has no checkpoint of step {step}; its checkpoints are steps {have} (older "
                     "ones are deleted beyond checkpoint.keep_last)")


def step_model(run_dir: str | os.PathLike[str], step: int | None = None) -> tuple[DeepSeekMoEForCausalLM, int]:
    """(the model at ``step`` of the run, on the CPU in the run's float32 master weights; the step)."""
    from deepseek_moe.config import ModelConfig
    from deepseek_moe.io.streaming import finish_runtime_state, skip_init
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    step_dir = find_step(run_dir, step)
    try:
        cfg = ModelConfig.from_dict(config["resolved_model"])
    except (TypeError, ValueError) as e:
        raise TrainError(f"{run_dir / 'config.json'}: resolved_model is not a valid model config: {e}") from e
    with torch.device("meta"), skip_init():
        model = DeepSeekMoEForCausalLM(cfg)
    state = read_model_state(step_dir)  # any checkpoint format: DCP's sharded files, or format 2
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        raise TrainError(f"checkpoint {step_dir} does not match the model of {run_dir / 'config.json'} (first "
                         f"difference: {diff[0]}); was config.json edited?")
    model.load_state_dict(state, assign=True)  # the step's tensors become the parameters: no second copy
    if cfg.tie_word_embeddings:
        model.head.weight = model.embed.weight
    finish_runtime_state(model, torch.device("cpu"))
    model.tokenizer = run_tokenizer(run_dir, config)
    return model.eval(), int(step_dir.name.removeprefix("step-"))


def run_tokenizer(run_dir: Path, config: dict[str, Any]) -> Any:
    """The run's tokenizer: ``model/tokenizer.json`` once the run finished, else the cached one it trained with
    (checked against config.json's hash); None when neither is there."""
    from tokenizers import Tokenizer

    from deepseek_moe.train.data import tokenizer_sha256
    from deepseek_moe.train.tokenizer import default_cache_dir

    written = run_dir / "model" / "tokenizer.json"
    if written.is_file():
        return Tokenizer.from_file(str(written))
    data, corpus, recorded = config.get("data") or {}, config.get("corpus") or {}, config.get("tokenizer") or {}
    if not corpus.get("sha256") or not data.get("vocab_size"):
        return None
    cache = Path(data["cache_dir"]).expanduser() if data.get("cache_dir") else default_cache_dir()
    cached = cache / "tokenizers" / f"{corpus['sha256'][:20]}-v{data['vocab_size']}.json"
    if not cached.is_file():
        return None
    tok = Tokenizer.from_file(str(cached))
    return tok if tokenizer_sha256(tok) == recorded.get("sha256") else None


def export_step(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
                step: int | None = None) -> tuple[str, int]:
    """Write the Hugging Face checkpoint of ``step`` (None: the latest) of a run to ``out``; returns (the format
    written, see ``save_pretrained``; the step)."""
    from deepseek_moe.io.save import save_pretrained

    model, done = step_model(run_dir, step)
    return save_pretrained(model, out), done


__all__ = ["export_step", "find_step", "run_tokenizer", "step_model"]
