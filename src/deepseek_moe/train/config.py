"""TrainConfig: everything a training run needs, as frozen, validated, nested dataclasses.

A run's ``config.json`` is ``TrainConfig.to_dict()`` plus the resolved model and corpus; ``from_dict`` reads it
back. ``apply_overrides`` implements ``--set a.b.c=VALUE``. Every default is defined once, here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deepseek_moe.config import ModelConfig, MoEConfig, _require  # one validation helper for every config
from deepseek_moe.model.block import CHECKPOINTING_MODES
from deepseek_moe.train.errors import TrainError
from deepseek_moe.train.narrow_moments import check_betas


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(_is_int(value) and value > 0, f"{name} ({value!r}) must be a positive integer")


def _non_negative_int(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(_is_int(value) and value >= 0, f"{name} ({value!r}) must be an integer >= 0")


def _fraction(obj: Any, name: str, *, closed: bool = True) -> None:
    value = getattr(obj, name)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0)
    _require(ok, f"{name} ({value!r}) must be in {'[0, 1]' if closed else '(0, 1)'}")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A preset from ``deepseek_moe.presets`` and ModelConfig fields to change (``moe`` as a nested dict).

    ``vocab_size`` always comes from the trained tokenizer; ``max_seq_len`` is raised to ``data.seq_len``.
    """

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(isinstance(self.preset, str) and bool(self.preset), f"model.preset ({self.preset!r}) must be "
                 "a preset name")
        _require(isinstance(self.overrides, dict), f"model.overrides ({self.overrides!r}) must be a table")
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
        for key, value in self.overrides.items():
            _require(key in model_fields, f"unknown config field 'model.{key}' (ModelConfig has: "
                     f"{', '.join(sorted(model_fields))})")
            if key == "moe":
                _require(isinstance(value, dict), f"model.moe ({value!r}) must be a table of MoEConfig fields")
                for sub in value:
                    _require(sub in moe_fields, f"unknown config field 'model.moe.{sub}' (MoEConfig has: "
                             f"{', '.join(sorted(moe_fields))})")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the text comes from and how it is cut. No ``paths``: the embedded CPython stdlib corpus.
    ``val_paths``: the validation text (and all of ``paths`` trains); none: ``val_fraction`` of the documents,
    chosen by name."""

    paths: tuple[str, ...] = ()
    val_paths: tuple[str, ...] = ()  # validation text apart from the training text; none: val_fraction by name
    text_field: str = "text"  # the field read from .jsonl records
    seq_len: int = 256
    vocab_size: int = 4096  # byte-level BPE trained on the training split
    val_fraction: float = 0.05  # of documents, chosen by hashing their names
    cache_dir: str | None = None  # tokenizer and token arrays; None: ~/.cache/deepseek_moe

    def __post_init__(self) -> None:
        for name in ("paths", "val_paths"):
            value = getattr(self, name)
            _require(isinstance(value, tuple) and all(isinstance(p, str) and p for p in value),
                     f"data.{name} ({value!r}) must be a list of non-empty path strings")
        _positive_int(self, "seq_len", "vocab_size")
        _require(self.vocab_size >= 256 + 1, f"vocab_size ({self.vocab_size}) must be > 256 (byte-level BPE "
                 "starts from 256 byte tokens)")
        _require(self.vocab_size < 2**32, f"vocab_size ({self.vocab_size}) must be < 2**32")
        _fraction(self, "val_fraction", closed=False)


OPTIMIZER_MOMENTS = ("float32", "bfloat16")  # OptimConfig.moments


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW. Norm weights, biases and other 1-D parameters get no weight decay."""

    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # dtype AdamW keeps its two moments in between steps: "bfloat16" halves their memory as DeepSeek-V3 does
    # (§3.3.3; train/narrow_moments.py), and needs 1 - beta >= 2^-7 for both betas (the default 0.95 qualifies)
    moments: str = "float32"

    def __post_init__(self) -> None:
        _require(isinstance(self.lr, int | float) and self.lr > 0, f"lr ({self.lr!r}) must be > 0")
        _require(isinstance(self.betas, tuple) and len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"betas ({self.betas!r}) must be two numbers in [0, 1)")
        _require(self.eps > 0, f"eps ({self.eps!r}) must be > 0")
        _require(self.weight_decay >= 0, f"weight_decay ({self.weight_decay!r}) must be >= 0")
        _require(self.grad_clip >= 0, f"grad_clip ({self.grad_clip!r}) must be >= 0")
        _require(self.moments in OPTIMIZER_MOMENTS,
                 f"optim.moments ({self.moments!r}) must be one of {', '.join(map(repr, OPTIMIZER_MOMENTS))}")
        if self.moments == "bfloat16":
            check_betas(self.betas, "optim.betas (with optim.moments = 'bfloat16')")


# DeepSeek-V3's MTP loss weight (§4.2): 0.3 for the first 10T of its 14.8T tokens, 0.1 for the rest.
V3_MTP_LAMBDA: tuple[tuple[float, float], ...] = ((0.0, 0.3), (10 / 14.8, 0.1))


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Steps and batches; the learning rate warms up linearly, then follows a cosine down to min_lr_ratio * lr at
    the last of ``steps``. ``extra_steps`` (what ``--extend-steps`` adds to a run it resumes) continue past that
    plan at its final learning rate, in its last routing stage; the plan itself never changes within a run."""

    steps: int = 200  # optimizer steps (the default run: 0.8M tokens, about 5 minutes on 2 CPU cores)
    batch_size: int = 16  # sequences per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    extra_steps: int = 0  # past ``steps``, at min_lr_ratio * lr
    # The MTP loss weight λ by stage, when the model has MTP modules (model.mtp_depth > 0): (start, λ) pairs, start
    # the fraction of ``steps`` where λ takes over (the first 0); extra steps keep the last λ. Default V3's.
    mtp_lambda: tuple[tuple[float, float], ...] = V3_MTP_LAMBDA

    def __post_init__(self) -> None:
        _positive_int(self, "steps", "batch_size", "grad_accum_steps")
        _non_negative_int(self, "extra_steps")
        _fraction(self, "warmup_fraction")
        _fraction(self, "min_lr_ratio")
        object.__setattr__(self, "mtp_lambda", _lambda_stages(self.mtp_lambda))

    def mtp_lambda_at(self, step: int) -> float:
        """λ of optimizer step ``step`` (0-based): the last stage whose start (round(start * steps)) is <= step."""
        weight = self.mtp_lambda[0][1]
        for start, value in self.mtp_lambda:
            if step >= round(start * self.steps):
                weight = value
        return weight

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_fraction * self.steps)

    @property
    def total_steps(self) -> int:
        return self.steps + self.extra_steps


def _lambda_stages(value: Any) -> tuple[tuple[float, float], ...]:
    """schedule.mtp_lambda as a tuple of (start, λ) float pairs (TOML and JSON give lists), or ValueError."""
    rule = ("schedule.mtp_lambda ({!r}) must be a list of [start, lambda] pairs: starts fractions of schedule.steps "
            "rising from 0, lambdas >= 0 (V3: [[0, 0.3], [0.676, 0.1]])")
    ok = isinstance(value, list | tuple) and len(value) > 0
    pairs: list[tuple[float, float]] = []
    for pair in value if ok else ():
        if not (isinstance(pair, list | tuple) and len(pair) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in pair)):
            ok = False
            break
        pairs.append((float(pair[0]), float(pair[1])))
    ok = ok and pairs[0][0] == 0.0 and all(0.0 <= s <= 1.0 and 0.0 <= lam < math.inf for s, lam in pairs)
    ok = ok and all(a[0] < b[0] for a, b in zip(pairs, pairs[1:], strict=False))
    _require(ok, rule.format(value))
    return tuple(pairs)


@dataclass(frozen=True, kw_only=True)
class RoutingConfig:
    """The three routing stages: uniform warm-up, learned routing, optional fine-tuning with frozen experts.

    Stage 1 is the first ``uniform_steps`` steps (None: ``uniform_fraction`` of all steps); stage 3 the last
    ``finetune_steps``, during which the routed experts listed in ``frozen_experts`` (in every MoE layer)
    receive no update.
    """

    uniform_steps: int | None = None
    uniform_fraction: float = 0.05
    finetune_steps: int = 0
    frozen_experts: tuple[int, ...] = ()
    orthogonal_init: bool = False  # orthogonal initialisation of the routed experts' weights
    # The routing-entropy regulariser (MoEConfig.entropy_loss_alpha) is strongest when learned routing starts and
    # falls linearly to 0 over this fraction of all steps (None: constant).
    entropy_decay_fraction: float | None = 0.5

    def __post_init__(self) -> None:
        if self.uniform_steps is not None:
            _non_negative_int(self, "uniform_steps")
        _fraction(self, "uniform_fraction")
        _non_negative_int(self, "finetune_steps")
        _require(isinstance(self.frozen_experts, tuple) and all(_is_int(e) and e >= 0 for e in self.frozen_experts),
                 f"frozen_experts ({self.frozen_experts!r}) must be a list of expert indices >= 0")
        _require(isinstance(self.orthogonal_init, bool), f"orthogonal_init ({self.orthogonal_init!r}) must be "
                 "true or false")
        if self.entropy_decay_fraction is not None:
            _require(isinstance(self.entropy_decay_fraction, int | float) and 0 < self.entropy_decay_fraction <= 1,
                     f"entropy_decay_fraction ({self.entropy_decay_fraction!r}) must be in (0, 1] or null")

    def stage_steps(self, steps: int) -> tuple[int, int]:
        """(first step of stage 2, first step of stage 3)."""
        uniform = self.uniform_steps if self.uniform_steps is not None else round(self.uniform_fraction * steps)
        return uniform, steps - self.finetune_steps


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every: int = 100  # steps between resumable checkpoints (and the last step); 0: only at the end
    keep_last: int = 2

    def __post_init__(self) -> None:
        _non_negative_int(self, "every")
        _positive_int(self, "keep_last")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    every: int = 60  # steps between validation passes (and the last step)
    batches: int = 4  # validation micro-batches per pass
    log_every: int = 10  # steps between metrics.jsonl records
    sample_prompt: str = "def "
    sample_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 40

    def __post_init__(self) -> None:
        _positive_int(self, "every", "batches", "log_every")
        _non_negative_int(self, "sample_tokens", "top_k")
        _require(self.temperature >= 0, f"temperature ({self.temperature!r}) must be >= 0")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available, else cpu
    # "auto": bf16 autocast where the device multiplies bf16 natively (CUDA; CPUs with AVX512-BF16 or AMX), else fp32
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    out: str | None = None  # run directory; None: runs/<YYYYmmdd-HHMMSS>
    threads: int = 0  # torch intra-op threads; 0: torch's default
    # Under N processes: the expert-parallel size (a divisor of N and of every n_expert_groups); 0: automatic,
    # the largest that fits. Every process is data-parallel (FSDP2) whatever ep is.
    ep: int = 0
    # Recompute activations in the backward instead of keeping them: "full" each whole block (memory at long
    # sequences), "attention" only its attention half (model/block.py); true and false: "full" and "none".
    activation_checkpointing: bool | Literal["none", "full", "attention"] = False
    # true: glibc malloc keeps freed memory for reuse instead of page-faulting each step's tensors in afresh
    # (deepseek_moe.device.keep_freed_memory); false: malloc's defaults; "release": every block of 1 MB or more
    # is unmapped when freed, the lowest peak memory at a page fault per page (device.release_freed_memory)
    keep_freed_memory: bool | Literal["release"] = True
    # Under bf16 autocast, keep each matrix weight's bf16 copy from one step to the next, rewritten by the
    # optimizer's pass (deepseek_moe.nn.compute_copy); false: autocast casts every weight afresh each forward
    compute_copies: bool = True

    def __post_init__(self) -> None:
        _non_negative_int(self, "seed", "threads", "ep")
        _require(isinstance(self.activation_checkpointing, bool) or self.activation_checkpointing in
                 CHECKPOINTING_MODES, f"activation_checkpointing ({self.activation_checkpointing!r}) must be a bool "
                 f"or one of {', '.join(CHECKPOINTING_MODES)}")
        _require(isinstance(self.compute_copies, bool), f"compute_copies ({self.compute_copies!r}) must be a bool")
        _require(isinstance(self.keep_freed_memory, bool) or self.keep_freed_memory == "release",
                 f"keep_freed_memory ({self.keep_freed_memory!r}) must be a bool or 'release'")
        _require(self.dtype in ("auto", "fp32", "bf16"), f"dtype ({self.dtype!r}) must be one of 'auto', "
                 "'fp32', 'bf16'")
        _require(isinstance(self.device, str) and bool(self.device), f"device ({self.device!r}) must be a string")
        uniform_end, finetune_start = self.routing.stage_steps(self.schedule.steps)
        _require(uniform_end <= finetune_start,
                 f"routing stages overlap: uniform warm-up ends at step {uniform_end} but fine-tuning starts at "
                 f"step {finetune_start} of schedule.steps ({self.schedule.steps})")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _build(cls, data, "")


# ---- dict <-> dataclass ---------------------------------------------------------------------------------------

def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config field '{prefix}{unknown[0]}' (known in "
                         f"'{prefix.rstrip('.') or '<root>'}': {', '.join(sorted(names))})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if cls is TrainConfig and name == "model" and isinstance(value, dict):
                value = _model_spec_dict(value)
            kwargs[name] = _build(typing.cast(type, hint), value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(hint, value)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any) -> Any:
    """JSON/TOML give lists where the config holds tuples, and ints where it holds floats."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        for arg in args:
            if arg is not type(None) and value is not None:
                return _coerce(arg, value)
        return value
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if hint is float and _is_int(value):
        return float(value)
    return value


def _model_spec_dict(value: dict[str, Any]) -> dict[str, Any]:
    """Accept both ``{preset, overrides}`` and the resolved form a run writes (``preset`` + ModelConfig fields)."""
    if set(value) <= {"preset", "overrides"}:
        return value
    value = dict(value)
    spec = {"preset": value.pop("preset", ModelSpec().preset), "overrides": value.pop("overrides", {})}
    spec["overrides"] = {**value, **spec["overrides"]}
    return spec


# ---- files and --set -------------------------------------------------------------------------------------------

def load_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (``.toml``) or JSON file, nested like TrainConfig."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise TrainError(f"config file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from e
    if not isinstance(data, dict):
        raise TrainError(f"config file {str(path)!r} must hold a table at the top level")
    return data


def parse_value(text: str) -> Any:
    """A JSON or TOML literal (``3e-4``, ``true``, ``[1, 2]``, ``"x"``), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=VALUE`` assignments to a config dict; unknown fields raise ValueError naming them.

    ``model.X`` other than ``model.preset`` sets ModelConfig field X (``model.moe.Y`` a MoEConfig field).
    """
    data = json.loads(json.dumps(data))  # deep copy
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r} must look like a.b.c=VALUE")
        parts = key.split(".")
        if parts[0] == "model" and len(parts) > 1 and parts[1] not in ("preset", "overrides"):
            parts = ["model", "overrides", *parts[1:]]
        _check_path(parts, key)
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: '{part}' is not a section")
        node[parts[-1]] = parse_value(raw)
    return data


def _check_path(parts: list[str], key: str) -> None:
    cls: Any = TrainConfig
    for i, part in enumerate(parts):
        if cls is None:
            raise ValueError(f"unknown config field '{key}': '{'.'.join(parts[:i])}' is not a section")
        if cls is dict:  # model.overrides.*: checked by ModelSpec
            if part == "moe" and i == len(parts) - 2:
                return
            if i != len(parts) - 1 and part != "moe":
                raise ValueError(f"unknown config field '{key}'")
            return
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            raise ValueError(f"unknown config field '{key}' ('{part}' is not one of "
                             f"{', '.join(sorted(names))})")
        hint = typing.get_type_hints(cls)[part]
        cls = hint if dataclasses.is_dataclass(hint) else (dict if cls is ModelSpec and part == "overrides"
                                                           else None)
    if dataclasses.is_dataclass(cls):
        raise ValueError(f"config field '{key}' is a section; set one of its fields, e.g. '{key}.<field>'")


def resolve_config(*, config_file: str | Path | None = None, assignments: list[str] = (),  # type: ignore[assignment]
                   base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < ``base`` (a resumed run's config) < config file < ``--set`` assignments."""
    data: dict[str, Any] = dict(base or {})
    if config_file is not None:
        data = _merge(data, load_config_file(config_file))
    data = apply_overrides(data, list(assignments))
    return TrainConfig.from_dict(data)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


__all__ = ["TrainConfig", "ModelSpec", "DataConfig", "OptimConfig", "ScheduleConfig", "RoutingConfig",
           "CheckpointConfig", "EvalConfig", "apply_overrides", "load_config_file", "parse_value",
           "resolve_config"]
