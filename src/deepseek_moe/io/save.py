"""``save_pretrained``: any DeepSeekMoEForCausalLM -> a checkpoint directory that ``load_pretrained`` reads.

The format is the most widely readable one that expresses the model exactly:

* MLA models that transformers' DeepSeek-V2/V3 classes hold: their layout (``deepseek_v2``/``deepseek_v3``);
* MHA models that DeepSeekMoE 16B's published layout holds: it (``model_type: "deepseek"``);
* anything else (softmax scores with the routing bias, say): our own documented format (io/native.py).

The directory is written beside its destination and swapped into place in one step (io/atomic.py): a reader
sees the old checkpoint or the new one, never a mix, and an interrupted save leaves the old one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deepseek_moe.io.atomic import staged_checkpoint
from deepseek_moe.io.formats import format_of_model
from deepseek_moe.io.hf import MTP_SHARED_COPIES, config_to_hf, hf_model_type, mtp_ours_to_hf, ours_to_hf
from deepseek_moe.io.hf_deepseek import config_to_deepseek, deepseek_incompatibility
from deepseek_moe.io.load import CONFIG_FILE, DTYPES, INDEX_FILE, SINGLE_FILE, TOKENIZER_FILE
from deepseek_moe.io.native import FORMAT, adapted_capacity, native_config_json
from deepseek_moe.io.safetensors_file import SafetensorsWriter

if TYPE_CHECKING:
    from deepseek_moe.config import ModelConfig
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in ``5GB`` / ``500MiB`` / an int (transformers' convention: GB = 10^9)."""
    if isinstance(size, int):
        return size
    m = _SIZE.match(size)
    if not m:
        raise ValueError(f"max_shard_size ({size!r}) must be bytes or like '5GB', '500MB', '2GiB'")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def checkpoint_format(cfg: ModelConfig) -> str:
    """``deepseek_v2``, ``deepseek_v3``, ``deepseek`` (DeepSeekMoE 16B) or ``deepseek_moe`` (ours) for ``cfg``."""
    if cfg.attention == "mha":
        return "deepseek" if deepseek_incompatibility(cfg) is None else FORMAT
    try:
        return hf_model_type(cfg)
    except ValueError:
        return FORMAT


@dataclass(frozen=True)
class Entry:
    """One tensor of a written checkpoint: ``key`` in the files, filled from our tensor ``name`` (its row
    ``expert`` when stacked), or a constant the format requires (``value``)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    name: str | None = None
    expert: int | None = None
    value: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Plan:
    """What ``save_pretrained`` writes for a model, decided from its names, shapes and dtypes alone."""

    format: str
    config: dict[str, Any]
    entries: list[Entry]
    metadata: dict[str, str]


def checkpoint_plan(model: DeepSeekMoEForCausalLM, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
                    quantization_config: Mapping[str, Any] | None = None) -> Plan:
    """The format, config.json and the tensors (in order) that ``save_pretrained`` writes for ``model``; no
    data is read. ``shapes``: the global shape of each tensor when the model is laid out over processes (a
    process then holds part of them); otherwise each tensor's own shape, and a RoutedExperts holding a range of
    experts (``offset``) writes those experts under their global indices."""
    cfg: ModelConfig = model.config
    fmt = checkpoint_format(cfg)
    dtype = _dtype_name(model)
    if fmt == "deepseek":
        config = config_to_deepseek(cfg, dtype=dtype)
    elif fmt == FORMAT:
        config = native_config_json(cfg, dtype=dtype, capacity_factors=adapted_capacity(model))
    else:
        config = config_to_hf(cfg, dtype=dtype)
    weights = format_of_model(model)  # a registered weight format (deepseek_moe.quant's): io/formats.py
    if quantization_config is None and weights is not None:
        quantization_config = weights[1]
    if quantization_config:
        config["quantization_config"] = dict(quantization_config)
    stored_name = weights[0].stored_name if weights is not None else _same
    entries = (_native_entries(model, shapes, stored_name) if fmt == FORMAT
               else _hf_entries(model, shapes, stored_name))
    return Plan(fmt, config, entries, {"format": FORMAT if fmt == FORMAT else "pt"})


def _same(name: str) -> str:
    return name


def _named_tensors(model: DeepSeekMoEForCausalLM, shapes: Mapping[str, tuple[int, ...]] | None
                   ) -> Iterator[tuple[str, torch.Tensor, tuple[int, ...]]]:
    """(name, tensor, global shape) of every parameter and persistent buffer, a tied one once."""
    cfg: ModelConfig = model.config
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if cfg.tie_word_embeddings and name == "head.weight":
            continue
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield name, tensor, tuple(shapes[name]) if shapes is not None else tuple(tensor.shape)


def _hf_entries(model: DeepSeekMoEForCausalLM, shapes: Mapping[str, tuple[int, ...]] | None,
                stored_name: Callable[[str], str]) -> list[Entry]:
    """Hugging Face keys in model order; stacked experts split per expert, as the hub has them. ``stored_name``:
    the plain name a tensor is stored under (a quantised weight's codes under its weight's)."""
    cfg: ModelConfig = model.config
    entries: list[Entry] = []
    main: dict[str, Entry] = {}
    for name, tensor, shape in _named_tensors(model, shapes):
        stored = stored_name(name)
        mapped = mtp_ours_to_hf(stored, cfg.n_layers) if stored.startswith("mtp.") else ours_to_hf(stored)
        if mapped is None:
            raise ValueError(f"model tensor {name!r} has no Hugging Face name in io/hf.py KEY_TABLE")
        key, stacked = mapped
        if stacked:
            first = 0 if shapes is not None else getattr(model.get_submodule(name.rpartition(".")[0]), "offset", 0)
            entries.extend(Entry(key.replace("{e}", str(e)), tensor.dtype, shape[1:], name, e)
                           for e in range(first, first + shape[0]))
        else:
            entries.append(Entry(key, tensor.dtype, shape, name))
            main[name] = entries[-1]
    fmt = checkpoint_format(cfg)
    if fmt not in ("deepseek_v2", "deepseek_v3"):
        return entries
    # Each MTP layer carries copies of the embedding and head it shares, as V3's checkpoint does (its readers
    # expect them); a tied head's copy is the embedding.
    for k in range(cfg.mtp_depth):
        for ours, theirs in MTP_SHARED_COPIES:
            source = main.get("embed.weight" if cfg.tie_word_embeddings else ours)
            if source is not None:  # (a quantised head has no plain entry: its copy is left out)
                entries.append(Entry(f"model.layers.{cfg.n_layers + k}.{theirs}", source.dtype, source.shape,
                                     source.name))
    dtype = next(iter(model.parameters())).dtype
    for i in range(cfg.n_dense_layers, cfg.n_layers + cfg.mtp_depth):
        if fmt == "deepseek_v3" and not cfg.moe.use_routing_bias:
            # deepseek_v3 always has the correction bias; ours is off, which is a zero bias.
            bias = torch.zeros(cfg.moe.n_routed_experts, dtype=torch.float32)
            entries.append(Entry(f"model.layers.{i}.mlp.gate.e_score_correction_bias", bias.dtype,
                                 tuple(bias.shape), value=bias))
        if cfg.moe.n_shared_experts == 0:
            # transformers always builds shared experts; with none they are zero-width, and it expects the keys.
            prefix = f"model.layers.{i}.mlp.shared_experts."
            for leaf, zero_shape in (("gate_proj.weight", (0, cfg.dim)), ("up_proj.weight", (0, cfg.dim)),
                                     ("down_proj.weight", (cfg.dim, 0))):
                entries.append(Entry(prefix + leaf, dtype, zero_shape, value=torch.zeros(zero_shape, dtype=dtype)))
    return entries


def _native_entries(model: DeepSeekMoEForCausalLM, shapes: Mapping[str, tuple[int, ...]] | None,
                    stored_name: Callable[[str], str]) -> list[Entry]:
    return [Entry(stored_name(name), tensor.dtype, shape, name) for name, tensor, shape in _named_tensors(model, shapes)]


def _entry_tensors(model: DeepSeekMoEForCausalLM, entries: list[Entry]) -> Iterator[tuple[str, torch.Tensor]]:
    """The data of each entry, for a model this process holds whole."""
    state = model.state_dict(keep_vars=True)
    weights = format_of_model(model)
    for entry in entries:
        if entry.value is not None:
            yield entry.key, entry.value
            continue
        assert entry.name is not None
        tensor = state[entry.name].detach()
        if entry.expert is not None:
            first = getattr(model.get_submodule(entry.name.rpartition(".")[0]), "offset", 0)
            tensor = tensor[entry.expert - first]  # a view: the writer copies its bytes out
        yield entry.key, weights[0].stored_tensor(model, entry.name, tensor) if weights is not None else tensor


def _dtype_name(model: torch.nn.Module) -> str | None:
    names = {v: k for k, v in DTYPES.items()}
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return names.get(p.dtype)
    return None


def save_pretrained(model: DeepSeekMoEForCausalLM, path: str | os.PathLike[str], *,
                    max_shard_size: int | str = "5GB",
                    quantization_config: Mapping[str, Any] | None = None,
                    extra_files: Sequence[str | os.PathLike[str]] = ()) -> str:
    """Write config.json, model.safetensors (or shards + index) and tokenizer.json; returns the format written
    (see the module docstring; ``<quant_method>_quantized`` for a model in a registered weight format, e.g.
    quantised by deepseek_moe.quant: the same layout with its codes and scales, io/formats.py).
    ``quantization_config`` (default: the weight format's) is written into config.json as is. ``extra_files``
    (tokenizer_config.json, say) are copied in with them, in the same atomic step."""
    plan = checkpoint_plan(model, quantization_config=quantization_config)
    write_checkpoint(Path(path), _entry_tensors(model, plan.entries), plan.config, parse_size(max_shard_size),
                     getattr(model, "tokenizer", None), metadata=plan.metadata, extra_files=extra_files)
    weights = format_of_model(model)
    return f"{weights[0].quant_method}_quantized" if weights is not None else plan.format


def replaced_by_a_save(name: str) -> bool:
    """The files of a checkpoint directory a new save replaces: its config, tokenizer and every safetensors file
    or index (weights the new checkpoint does not name are stale). The rest, e.g. a README, are kept."""
    return name in (CONFIG_FILE, TOKENIZER_FILE) or ".safetensors" in name


def write_checkpoint(path: Path, entries: Iterator[tuple[str, torch.Tensor]], config: Mapping[str, Any],
                     limit: int, tokenizer: Any, *, metadata: dict[str, str],
                     extra_files: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Shards of at most ``limit`` bytes (one tensor may exceed it), written one at a time, each tensor streamed
    into its file (``SafetensorsWriter``), in a directory beside ``path`` that then replaces it in one step
    (io/atomic.py): a reader sees the old checkpoint or the new one, never a mix, and an interrupted save
    leaves the old one. ``extra_files`` are copied in beside the weights."""
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = total = 0
    for key, tensor in entries:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, tensor))
        size += nbytes
        total += nbytes
    names = ([SINGLE_FILE] if len(shards) == 1
             else [f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)])
    with staged_checkpoint(path, replaces=replaced_by_a_save) as stage:
        for name, shard in zip(names, shards, strict=True):
            # Streamed a tensor at a time from the model's own storage: no copy of the shard is assembled first.
            writer = SafetensorsWriter(stage / name, [(k, t.dtype, tuple(t.shape)) for k, t in shard], metadata)
            try:
                for k, t in shard:
                    writer.write(k, t)
            except BaseException:
                writer.abort()  # the original error, not the writer's complaint about unwritten tensors
                raise
            writer.close()
        if len(shards) > 1:
            weight_map = {k: name for name, shard in zip(names, shards, strict=True) for k, _ in shard}
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (stage / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(str(stage / TOKENIZER_FILE))
        for extra in map(Path, extra_files):
            shutil.copy2(extra, stage / extra.name)
        (stage / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


__all__ = ["Entry", "Plan", "checkpoint_format", "checkpoint_plan", "parse_size", "replaced_by_a_save", "save_pretrained",
           "write_checkpoint"]
