"""Load and save Hugging Face DeepSeek-V2/V3 checkpoints (safetensors, single file or sharded).

Loading is lazy: each file is opened with ``safe_open`` and read tensor by tensor straight into the model's
parameters; a routed expert is copied into its slice of the stacked (E, ...) parameter, so no second full copy
of the weights is ever held. Every error names the file and the key.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepseek_moe.io.hf import (
    config_from_hf,
    config_to_hf,
    hf_fused_to_ours,
    hf_layer_index,
    hf_to_ours,
    ours_to_hf,
)

if TYPE_CHECKING:
    from deepseek_moe.config import ModelConfig
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Keys that old checkpoints carry and that hold nothing to load (recomputed RoPE tables).
_IGNORED = re.compile(r".*rotary_emb\.(inv_freq|cos_cached|sin_cached)\Z")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model its config describes."""


def _weight_map(path: Path) -> dict[str, Path]:
    """checkpoint key -> safetensors file holding it."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = {name: path / name for name in set(weight_map.values())}
        for name, file in files.items():
            if not file.is_file():
                raise CheckpointError(f"{index}: lists shard {name!r}, which does not exist in {path}")
        return {key: files[name] for key, name in weight_map.items()}
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    others = sorted(p.name for p in path.glob("*.bin")) if path.is_dir() else []
    hint = f" (found {', '.join(others)}: convert PyTorch .bin checkpoints to safetensors first)" if others else ""
    raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found{hint}")


def _resolve_dtype(dtype: torch.dtype | str | None, hf_cfg: dict[str, Any]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32"
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; expected one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def load_pretrained(path: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu", quantize: Any = None) -> DeepSeekMoEForCausalLM:
    """Build a DeepSeekMoEForCausalLM from a Hugging Face DeepSeek-V2/V3 checkpoint directory.

    ``dtype`` None: the config's ``dtype`` (``torch_dtype``), else float32. Layers >= num_hidden_layers (V3's
    multi-token-prediction modules) are skipped; ``lm_head.weight`` may be absent only with tied embeddings.
    ``quantize`` ("int8", "int4" or a ``deepseek_moe.quant.QuantConfig``) quantises while streaming; a
    checkpoint written quantised loads quantised without it (``deepseek_moe.quant``; ``dtype`` is then the
    dtype of the unquantised parts and of the activations).
    """
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
    from deepseek_moe.quant.load import is_quantized_checkpoint, load_quantized

    path = Path(path)
    if quantize is not None or is_quantized_checkpoint(path):
        return load_quantized(path, dtype=dtype, quantize=quantize, device=device)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}")
    hf_cfg = json.loads(config_file.read_text())
    cfg = config_from_hf(hf_cfg, source=str(config_file))
    weight_map = _weight_map(path)
    for key, file in weight_map.items():
        if key.endswith("_scale_inv"):
            raise CheckpointError(f"{file}: {key!r} is an FP8 scale: quantised checkpoints are not supported; "
                                  "dequantise to bf16/fp32 first")

    torch_dtype = _resolve_dtype(dtype, hf_cfg)
    with torch.device(device):
        model = DeepSeekMoEForCausalLM(cfg)
    if torch_dtype != torch.float32:
        # Parameters only: the RoPE table and V3's correction bias stay float32, as in transformers.
        for param in model.parameters():
            param.data = param.data.to(torch_dtype)
    _load_weights(model, weight_map, n_layers=cfg.n_layers, tied=cfg.tie_word_embeddings)
    tokenizer_file = path / TOKENIZER_FILE
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        model.tokenizer = Tokenizer.from_file(str(tokenizer_file))
    return model.eval()


def _load_weights(model: torch.nn.Module, weight_map: dict[str, Path], *, n_layers: int, tied: bool) -> None:
    state = model.state_dict(keep_vars=True)
    params = dict(model.named_parameters())  # deduplicated: a tied head is not listed twice
    # What must be filled: every parameter, plus buffers the table names (V3's e_score_correction_bias).
    required: set[tuple[str, int | None]] = set()
    for name, tensor in state.items():
        mapped = ours_to_hf(name)
        if mapped is None:
            if name in params:
                raise CheckpointError(f"model parameter {name!r} has no Hugging Face name in io/hf.py KEY_TABLE")
            continue
        if tied and name == "head.weight":
            continue
        if mapped[1]:
            required.update((name, e) for e in range(tensor.shape[0]))
        else:
            required.add((name, None))

    loaded: set[tuple[str, int | None]] = set()
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key, file in weight_map.items():
        by_file[file].append(key)
    for file, keys in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f, torch.no_grad():
            present = set(f.keys())
            for key in keys:
                layer = hf_layer_index(key)
                if (layer is not None and layer >= n_layers) or _IGNORED.match(key):
                    continue  # V3 multi-token-prediction layers; recomputed RoPE tables
                if tied and key == "lm_head.weight":
                    continue  # transformers ties it to the embedding as well
                if key not in present:
                    raise CheckpointError(f"{file.parent / INDEX_FILE}: maps {key!r} to {file.name}, which does "
                                          "not contain it")
                for name, e, tensor in _targets(key, file, f):
                    if tensor.numel() == 0 and name not in state:
                        continue  # transformers' zero-width shared experts when n_shared_experts == 0
                    _copy_in(state, name, e, tensor, key, file)
                    loaded.add((name, e))
    missing = required - loaded
    if missing:
        names = sorted(_hf_name(name, e) for name, e in missing)
        shown = ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        where = sorted({str(p) for p in weight_map.values()})
        raise CheckpointError(f"checkpoint ({', '.join(where)}) is missing key(s) {shown}")


def _copy_in(state: dict[str, torch.Tensor], name: str, e: int | None, tensor: torch.Tensor, key: str,
             file: Path) -> None:
    if name not in state:
        raise CheckpointError(f"{file}: unexpected key {key!r} (no {name!r} in this model; is the config right?)")
    dest = state[name]
    if e is not None:
        if not 0 <= e < dest.shape[0]:
            raise CheckpointError(f"{file}: {key!r}: expert {e} out of range for {dest.shape[0]} routed experts "
                                  "(n_routed_experts in config.json)")
        dest = dest[e]
    if tuple(tensor.shape) != tuple(dest.shape):
        raise CheckpointError(f"{file}: {key!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)} "
                              f"(model {name!r})")
    dest.copy_(tensor)


def _hf_name(name: str, e: int | None) -> str:
    mapped = ours_to_hf(name)
    assert mapped is not None
    return mapped[0].replace("{e}", str(e)) if e is not None else mapped[0]


def _targets(key: str, file: Path, f: Any) -> Iterator[tuple[str, int | None, torch.Tensor]]:
    """(our name, expert index, tensor) for one checkpoint key; a fused expert tensor yields per-expert slices."""
    mapped = hf_to_ours(key)
    if mapped is not None:
        yield mapped[0], mapped[1], f.get_tensor(key)
        return
    fused = hf_fused_to_ours(key)
    if fused is None:
        raise CheckpointError(f"{file}: unexpected key {key!r} (not a DeepSeek-V2/V3 weight name)")
    tensor = f.get_tensor(key)  # (E, 2F, D) gate_up or (E, D, F) down: one layer's experts, read once
    parts = tensor.chunk(len(fused), dim=1)
    for name, part in zip(fused, parts, strict=True):
        for e in range(part.shape[0]):
            yield name, e, part[e]


# ----------------------------------------------------------------------------------------------------------
# Saving

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


def _hf_entries(model: DeepSeekMoEForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face key, tensor view) in model order; stacked experts split per expert, as the hub has them."""
    cfg: ModelConfig = model.config
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if cfg.tie_word_embeddings and name == "head.weight":
            continue
        mapped = ours_to_hf(name)
        if mapped is None:
            if isinstance(tensor, torch.nn.Parameter):
                raise ValueError(f"model parameter {name!r} has no Hugging Face name in io/hf.py KEY_TABLE")
            continue  # non-checkpoint buffers
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        key, stacked = mapped
        tensor = tensor.detach()
        if stacked:
            for e in range(tensor.shape[0]):
                yield key.replace("{e}", str(e)), tensor[e]
        else:
            yield key, tensor
    ref = next(iter(model.parameters()))
    for i in range(cfg.n_dense_layers, cfg.n_layers):
        if cfg.moe.score_func == "sigmoid" and not cfg.moe.use_routing_bias:
            # deepseek_v3 always has the correction bias; ours is off, which is a zero bias.
            yield (f"model.layers.{i}.mlp.gate.e_score_correction_bias",
                   torch.zeros(cfg.moe.n_routed_experts, dtype=torch.float32, device=ref.device))
        if cfg.moe.n_shared_experts == 0:
            # transformers always builds shared experts; with none they are zero-width, and it expects the keys.
            prefix = f"model.layers.{i}.mlp.shared_experts."
            yield prefix + "gate_proj.weight", ref.new_zeros(0, cfg.dim)
            yield prefix + "up_proj.weight", ref.new_zeros(0, cfg.dim)
            yield prefix + "down_proj.weight", ref.new_zeros(cfg.dim, 0)


def save_pretrained(model: DeepSeekMoEForCausalLM, path: str | os.PathLike[str], *,
                    max_shard_size: int | str = "5GB") -> None:
    """Write a Hugging Face checkpoint: config.json, model.safetensors (or shards + index), tokenizer.json.

    The result loads with transformers' ``AutoModelForCausalLM.from_pretrained``. A config transformers'
    DeepSeek models cannot express raises ValueError before anything is written.
    """
    from deepseek_moe.quant import quant_config_of, save_quantized

    if quant_config_of(model) is not None:
        save_quantized(model, path)  # our weight-only format (deepseek_moe.quant.format)
        return
    cfg: ModelConfig = model.config
    first = next(iter(model.parameters()))
    dtype_name = {v: k for k, v in _DTYPES.items()}.get(first.dtype)
    hf_cfg = config_to_hf(cfg, dtype=dtype_name)
    limit = parse_size(max_shard_size)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    # Plan shards from sizes alone, then materialise one shard at a time.
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    total = 0
    for key, tensor in _hf_entries(model):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, tensor))
        size += nbytes
        total += nbytes

    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file({k: t.contiguous().clone().cpu() for k, t in shards[0]}, path / SINGLE_FILE, metadata=metadata)
    else:
        weight_map: dict[str, str] = {}
        for n, shard in enumerate(shards, start=1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            # clone(): expert slices share their stacked storage, which safetensors refuses to write.
            save_file({k: t.contiguous().clone().cpu() for k, t in shard}, path / name, metadata=metadata)
            weight_map.update(dict.fromkeys((k for k, _ in shard), name))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (path / CONFIG_FILE).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(str(path / TOKENIZER_FILE))


__all__ = ["CheckpointError", "load_pretrained", "parse_size", "save_pretrained"]
