"""``load_pretrained``: any DeepSeek checkpoint directory -> DeepSeekMoEForCausalLM, streamed (io/streaming.py).

Layouts read: Hugging Face DeepSeek-V2/V3 (``deepseek_v2``/``deepseek_v3``, per-expert or transformers-fused
expert tensors, FP8 block-scaled weights dequantised on the way), DeepSeekMoE 16B's (``deepseek``), and our
own format (io/native.py). Single file or sharded with ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deepseek_moe.io.formats import format_of_config, quantizing_format
from deepseek_moe.io.fp8 import SCALE_SUFFIX, expected_scale_shape, fp8_block_size
from deepseek_moe.io.hf import (
    FP8_METHOD,
    MTP_SHARED_COPIES,
    config_from_hf,
    hf_fused_to_ours,
    hf_layer_index,
    hf_to_ours,
    mtp_hf_to_ours,
    mtp_ours_to_hf,
    ours_to_hf,
)
from deepseek_moe.io.native import is_native, native_config, restore_capacity
from deepseek_moe.io.safetensors_file import SafetensorsError, SafetensorsFile
from deepseek_moe.io.shapes import HF_FIELD, explain_mismatch
from deepseek_moe.io.streaming import (
    Block,
    CheckpointError,
    LoadHooks,
    Shard,
    is_stacked,
    skip_init,
    stream_into,
)

if TYPE_CHECKING:
    from deepseek_moe.config import ModelConfig
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# Keys that old checkpoints carry and that hold nothing to load (recomputed RoPE tables).
_IGNORED = re.compile(r".*rotary_emb\.(inv_freq|cos_cached|sin_cached)\Z")


def open_checkpoint(path: Path) -> dict[str, SafetensorsFile]:
    """checkpoint key -> the (parsed, shared) file holding it; the index, when there is one, decides."""
    index = path / INDEX_FILE
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files: dict[str, SafetensorsFile] = {}
            for name in weight_map.values():
                check_shard_name(index, name)
            for name in sorted(set(weight_map.values())):
                if not (path / name).is_file():
                    raise CheckpointError(f"{index}: lists shard {name!r}, which does not exist in {path}")
                files[name] = SafetensorsFile(path / name)
            for key, name in weight_map.items():
                if key not in files[name].tensors:
                    raise CheckpointError(f"{index}: maps {key!r} to {name}, which does not contain it")
            return {key: files[name] for key, name in weight_map.items()}
        single = path / SINGLE_FILE
        if single.is_file():
            f = SafetensorsFile(single)
            return dict.fromkeys(f.keys(), f)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from e
    others = sorted(p.name for p in path.glob("*.bin")) if path.is_dir() else []
    hint = f" (found {', '.join(others)}: convert PyTorch .bin checkpoints to safetensors first)" if others else ""
    raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found{hint}")


def check_shard_name(index: Path, name: object) -> None:
    """An index entry must be a plain file name inside the checkpoint directory: a hostile index could otherwise
    make the loader open any file (``../x``, ``/dev/zero``, a link out). A symbolic link may point only inside
    the directory or, as huggingface_hub's cache lays out a snapshot, into the repository's ``blobs/``."""
    directory = index.parent
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise CheckpointError(f"{index}: shard entry {name!r} is not a plain file name inside {directory}; "
                              "refusing to open files outside the checkpoint")
    shard = directory / name
    if shard.is_symlink():
        target = shard.resolve()
        inside = (directory.resolve(), directory.resolve().parent.parent / "blobs")
        if not any(target.parent == d for d in inside):
            raise CheckpointError(f"{index}: shard entry {name!r} is a link to {target}, outside {directory}; "
                                  "refusing to open files outside the checkpoint")


def resolve_dtype(dtype: torch.dtype | str | None, raw: Mapping[str, Any],
                  files: Mapping[str, SafetensorsFile]) -> torch.dtype:
    """The dtype asked for, else config.json's ``dtype``/``torch_dtype``, else the files' own (the floating dtype
    holding the most bytes; FP8 weights become bfloat16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or raw.get("dtype") or raw.get("torch_dtype")
    if name is not None:
        if name not in DTYPES:
            raise ValueError(f"dtype {name!r} is not supported; expected one of {', '.join(DTYPES)}")
        return DTYPES[name]
    stored: Counter[torch.dtype] = Counter()
    for key, f in files.items():
        info = f.info(key)
        if info.dtype.is_floating_point:
            stored[torch.bfloat16 if info.dtype in _FP8 else info.dtype] += info.nbytes
    return stored.most_common(1)[0][0] if stored else torch.float32


def hf_blocks(files: Mapping[str, SafetensorsFile], cfg: ModelConfig,
              fp8_block: tuple[int, int] | None) -> list[Block]:
    """Where each of our tensors lies in a Hugging Face layout (V2/V3/16B). Layers from ``n_layers`` on are V3's
    multi-token-prediction modules: read into ``mtp`` for the first ``cfg.mtp_depth`` of them, skipped beyond
    (``mtp=False`` loads none); their copies of the shared embedding and head are checked, not read
    (:func:`check_mtp_copies`)."""
    blocks: list[Block] = []
    for key, f in files.items():
        layer = hf_layer_index(key)
        if _IGNORED.match(key) or (layer is not None and layer >= cfg.n_layers + cfg.mtp_depth):
            continue  # recomputed RoPE tables; MTP layers not asked for
        if layer is not None and layer >= cfg.n_layers:
            if key.endswith(".weight" + SCALE_SUFFIX) and fp8_block is not None:
                continue  # read with its weight
            mtp = mtp_hf_to_ours(key, cfg.n_layers)
            if isinstance(mtp, str):
                continue  # a copy of a shared tensor
            if mtp is None:
                fused = hf_fused_to_ours(key)
                if fused is None:
                    raise CheckpointError(f"{f.path}: unexpected key {key!r} in multi-token-prediction layer {layer}")
                blocks.extend(_fused_blocks(f, key, [_in_mtp(n, cfg.n_layers) for n in fused]))
                continue
            name, expert = mtp
            if f.info(key).numel == 0 and cfg.moe.n_shared_experts == 0 and ".shared_experts." in name:
                continue  # transformers' zero-width shared experts, as in the main layers below
            scale_key = _fp8_scale(files, key, f, fp8_block)
            blocks.append(Block(name, expert, f, key, 0, f.info(key).shape, scale_key,
                                files[scale_key] if scale_key else None))
            continue
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue  # transformers ties it to the embedding as well
        if key.endswith(".weight" + SCALE_SUFFIX):
            if fp8_block is not None:
                continue  # read with its weight
            raise CheckpointError(f"{f.path}: {key!r} is an FP8 block scale, but config.json has no "
                                  f"quantization_config with quant_method {FP8_METHOD!r}")
        info = f.info(key)
        mapped = hf_to_ours(key)
        if mapped is not None:
            name, expert = mapped
            if info.numel == 0 and cfg.moe.n_shared_experts == 0 and ".shared_experts." in name:
                continue  # transformers' zero-width shared experts when n_shared_experts == 0
            scale_key = _fp8_scale(files, key, f, fp8_block)
            blocks.append(Block(name, expert, f, key, 0, info.shape, scale_key,
                                files[scale_key] if scale_key else None))
            continue
        fused = hf_fused_to_ours(key)
        if fused is None:
            raise CheckpointError(f"{f.path}: unexpected key {key!r} (not a DeepSeek weight name)")
        blocks.extend(_fused_blocks(f, key, fused))
    return blocks


def _fused_blocks(f: SafetensorsFile, key: str, names: list[str]) -> list[Block]:
    """(E, 2F, D) gate_up_proj is gate over up; (E, D, F) down_proj: one block per expert and part."""
    info = f.info(key)
    if info.dtype in _FP8:
        raise CheckpointError(f"{f.path}: {key!r} is a fused expert tensor in {info.dtype}; FP8 is read only "
                              "per expert, as DeepSeek ships it")
    n_experts, rows, cols = info.shape
    part_rows = rows // len(names)
    return [Block(name, e, f, key, (e * rows + p * part_rows) * cols, (part_rows, cols))
            for e in range(n_experts) for p, name in enumerate(names)]


def _in_mtp(name: str, n_layers: int) -> str:
    """``layers.{n_layers + k}.X`` (a fused expert name of MTP layer n_layers + k) -> ``mtp.{k}.block.X``."""
    layer, _, rest = name.removeprefix("layers.").partition(".")
    return f"mtp.{int(layer) - n_layers}.block.{rest}"


_COMPARE_CHUNK = 64 << 20


def check_mtp_copies(files: Mapping[str, SafetensorsFile], cfg: ModelConfig) -> None:
    """Each MTP layer's copies of the embedding and head (``embed_tokens``, ``shared_head.head``) must equal the
    main model's: the modules share them (as V3 trains them), so a differing copy could not be loaded or saved
    back. Compared byte for byte, a chunk at a time."""
    for k in range(cfg.mtp_depth):
        for ours, theirs in MTP_SHARED_COPIES:
            copy = f"model.layers.{cfg.n_layers + k}.{theirs}"
            main = ours_to_hf(ours)
            main_key = ("model.embed_tokens.weight" if cfg.tie_word_embeddings and ours == "head.weight"
                        else main[0] if main else "")
            if copy not in files or main_key not in files:
                continue
            a, b = files[copy].info(copy), files[main_key].info(main_key)
            same = a.shape == b.shape and a.dtype == b.dtype
            step = _COMPARE_CHUNK
            for first in range(0, a.nbytes if same else 0, step):
                n = min(step, a.nbytes - first)
                x, y = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
                files[copy].read_bytes_into(x, a.offset + first)
                files[main_key].read_bytes_into(y, b.offset + first)
                if not torch.equal(x, y):
                    same = False
                    break
            if not same:
                raise CheckpointError(f"{files[copy].path}: {copy!r} differs from {main_key!r}; the MTP module "
                                      "shares the main model's embedding and head (DeepSeek-V3), so this checkpoint's "
                                      "MTP layer cannot be loaded as one: load it with mtp=False")


def _fp8_scale(files: Mapping[str, SafetensorsFile], key: str, f: SafetensorsFile,
               fp8_block: tuple[int, int] | None) -> str | None:
    """The checked ``weight_scale_inv`` key of an FP8 weight, or None for a weight stored in a float dtype."""
    info = f.info(key)
    if info.dtype not in _FP8:
        return None
    if fp8_block is None:
        raise CheckpointError(f"{f.path}: {key!r} is stored as {info.dtype} but config.json has no "
                              f"quantization_config with quant_method {FP8_METHOD!r} to say how it is scaled")
    if info.dtype != torch.float8_e4m3fn:
        raise CheckpointError(f"{f.path}: {key!r} is {info.dtype}; FP8 weights must be float8_e4m3fn")
    scale_key = key + SCALE_SUFFIX
    if scale_key not in files:
        raise CheckpointError(f"{f.path}: FP8 weight {key!r} has no block scale {scale_key!r} in the checkpoint")
    if len(info.shape) != 2:
        raise CheckpointError(f"{f.path}: FP8 weight {key!r} has shape {list(info.shape)}; block scaling needs "
                              "a matrix")
    expected = expected_scale_shape(info.shape, fp8_block)
    scale = files[scale_key].info(scale_key)
    if scale.shape != expected:
        raise CheckpointError(f"{files[scale_key].path}: FP8 scale {scale_key!r} has shape {list(scale.shape)}, "
                              f"expected {list(expected)} for weight {key!r} of shape {list(info.shape)} in "
                              f"{fp8_block[0]}x{fp8_block[1]} blocks (quantization_config.weight_block_size)")
    if not scale.dtype.is_floating_point:
        raise CheckpointError(f"{files[scale_key].path}: FP8 scale {scale_key!r} is {scale.dtype}, not a float")
    return scale_key


def native_blocks(files: Mapping[str, SafetensorsFile], cfg: ModelConfig) -> list[Block]:
    """Our own format: keys are our names; a stacked expert tensor gives one block per expert row."""
    blocks: list[Block] = []
    for key, f in files.items():
        if cfg.tie_word_embeddings and key == "head.weight":
            continue
        mtp = _NATIVE_MTP.match(key)
        if mtp and int(mtp.group(1)) >= cfg.mtp_depth:
            continue  # MTP modules not asked for (mtp=False)
        info = f.info(key)
        if is_stacked(key) and len(info.shape) >= 2:
            row = info.numel // info.shape[0]
            blocks.extend(Block(key, e, f, key, e * row, info.shape[1:]) for e in range(info.shape[0]))
        else:
            blocks.append(Block(key, None, f, key, 0, info.shape))
    return blocks


def check_layer_count(files: Mapping[str, SafetensorsFile], raw: Mapping[str, Any], cfg: ModelConfig,
                      config_file: Path) -> None:
    """A config with more layers than the files hold is refused before the model is built (each layer is
    modules, even on meta: a config naming a million layers would take gigabytes before any tensor is read)."""
    native = is_native(raw)
    layers = {int(m.group(1)) for key in files if (m := (_NATIVE_LAYER if native else _HF_LAYER).match(key))}
    held = max(layers) + 1 if layers else 0
    if cfg.n_layers > held:
        field = "n_layers" if native else HF_FIELD["n_layers"]
        raise CheckpointError(f"{config_file}: {field} is {cfg.n_layers}, but the checkpoint holds {held} layer(s)")


_NATIVE_LAYER = re.compile(r"layers\.(\d+)\.")
_NATIVE_MTP = re.compile(r"mtp\.(\d+)\.")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _hf_namer(n_layers: int) -> Callable[[str, int | None], str]:
    def name_of(name: str, expert: int | None) -> str:
        mapped = mtp_ours_to_hf(name, n_layers) if name.startswith("mtp.") else ours_to_hf(name)
        if mapped is None:
            return name if expert is None else f"{name}[{expert}]"
        return mapped[0].replace("{e}", str(expert)) if expert is not None else mapped[0]
    return name_of


def mtp_depth_held(files: Mapping[str, SafetensorsFile], raw: Mapping[str, Any], cfg: ModelConfig) -> int:
    """The MTP depth to build: config.json's, or 0 with a warning when the files hold no tensor of the first MTP
    module (a conversion that dropped it while keeping the config key, which other tools are known to do)."""
    if not cfg.mtp_depth:
        return 0
    if is_native(raw):
        held = any(_NATIVE_MTP.match(key) for key in files)
    else:
        held = any(hf_layer_index(key) == cfg.n_layers for key in files)
    if not held:
        key = "mtp_depth" if is_native(raw) else "num_nextn_predict_layers"
        warnings.warn(f"config.json says {key} = {cfg.mtp_depth} but the checkpoint holds no multi-token-prediction "
                      "layer; loading the model without it", stacklevel=3)
        return 0
    return cfg.mtp_depth


def read_config(path: str | os.PathLike[str]) -> tuple[dict[str, Any], ModelConfig]:
    """config.json's dict and the ModelConfig it describes (any layout); errors name the file."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: not readable JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, found {type(raw).__name__}")
    cfg = native_config(raw, source=str(config_file)) if is_native(raw) else config_from_hf(raw, source=str(config_file))
    return raw, cfg


def load_pretrained(path: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu", hooks: LoadHooks | None = None,
                    quantize: Any = None, mtp: bool = True) -> DeepSeekMoEForCausalLM:
    """Build a DeepSeekMoEForCausalLM from a checkpoint directory, streaming each tensor into place.

    ``dtype`` None: config.json's ``dtype`` (``torch_dtype``), else the files' own. Floating parameters take it;
    buffers (V3's correction bias) keep theirs. ``mtp``: load the multi-token-prediction modules the checkpoint
    holds (V3's layers from num_hidden_layers on, ``num_nextn_predict_layers`` of them) into ``model.mtp``, where
    they can draft and train and from where ``save_pretrained`` writes them back; False skips them and builds the
    model without (V3: 1.7% of the parameters, one MoE layer of 62). ``lm_head.weight`` may be absent only with
    tied embeddings. ``hooks``: see io/streaming.py.
    ``quantize`` ("int8", "int4" or a ``deepseek_moe.quant.QuantConfig``) quantises while streaming; a
    checkpoint written quantised loads quantised without it (``deepseek_moe.quant``, plugged in through
    io/formats.py; ``dtype`` is then the dtype of the unquantised parts and of the activations).
    """
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

    path = Path(path)
    raw, cfg = read_config(path)
    weights = quantizing_format() if quantize is not None else format_of_config(raw)
    files = open_checkpoint(path)
    hooks = hooks or LoadHooks()
    try:
        torch_dtype = resolve_dtype(dtype, raw, files)
        if weights is not None:  # a registered format (deepseek_moe.quant) supplies the hooks (io/formats.py)
            if weights.runs_on_cpu_only and torch.device(device).type != "cpu":
                raise ValueError(f"quantised models run on the CPU (device {device!r} asked)")
            hooks = weights.load_hooks(raw, quantize, torch_dtype, str(path), hooks)
        cfg = cfg.replace(mtp_depth=mtp_depth_held(files, raw, cfg) if mtp else 0)
        blocks, fp8, describe = _stored_blocks(path, raw, cfg, files)
        check_layer_count(files, raw, cfg, path / CONFIG_FILE)
        with torch.device("meta"), skip_init():
            model = DeepSeekMoEForCausalLM(cfg)
        stream_into(model, blocks, dtype=torch_dtype, device=torch.device(device), hooks=hooks, fp8_block=fp8,
                    describe_missing=describe, explain_shape=_explainer(raw), stored_apart=_stored_apart(cfg))
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from e
    finally:
        for f in set(files.values()):
            f.close()
    if cfg.tie_word_embeddings:
        model.head.weight = model.embed.weight
    _restore_capacity(model, raw, path)
    _attach_tokenizer(model, path)
    return model.eval()


def _restore_capacity(model: DeepSeekMoEForCausalLM, raw: Mapping[str, Any], path: Path) -> None:
    """The adaptive capacity factors our format records (io/native.py); transformers' layouts hold no training
    recipe (io/recipe.py), so there is nothing to restore from them."""
    if is_native(raw):
        try:
            restore_capacity(model, raw, source=str(path / CONFIG_FILE))
        except ValueError as e:
            raise CheckpointError(str(e)) from e


def _stored_blocks(path: Path, raw: Mapping[str, Any], cfg: ModelConfig, files: Mapping[str, SafetensorsFile]
                   ) -> tuple[list[Block], tuple[int, int] | None, Callable[[str, int | None], str]]:
    """An opened checkpoint's tensors as blocks in our names (native or Hugging Face layout), its FP8 block size
    (None unless FP8), and how to name a missing tensor in the file's own terms."""
    quant = raw.get("quantization_config") or {}
    fp8 = fp8_block_size(quant, str(path / CONFIG_FILE)) if quant.get("quant_method") == FP8_METHOD else None
    if is_native(raw):
        return native_blocks(files, cfg), fp8, lambda n, e: n if e is None else f"{n}[{e}]"
    check_mtp_copies(files, cfg)
    return hf_blocks(files, cfg, fp8), fp8, _hf_namer(cfg.n_layers)


def _stored_apart(cfg: ModelConfig) -> frozenset[str]:
    return frozenset({"head.weight"}) if cfg.tie_word_embeddings else frozenset()


def _explainer(raw: Mapping[str, Any]) -> Callable[[str, tuple[int, ...], tuple[int, ...]], str]:
    """Shape errors in the config.json keys of the checkpoint's own layout."""
    hf = not is_native(raw)
    return lambda name, stored, expected: explain_mismatch(name, stored, expected, hf=hf)


def _attach_tokenizer(model: DeepSeekMoEForCausalLM, path: Path) -> None:
    tokenizer_file = path / TOKENIZER_FILE
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        model.tokenizer = Tokenizer.from_file(str(tokenizer_file))


def load_into(model: DeepSeekMoEForCausalLM, path: str | os.PathLike[str], *,
              shards: Mapping[str, Shard] | None = None) -> None:
    """Fill a model that is already built (on meta, or allocated) from the checkpoint at ``path``, in place.

    Each tensor keeps the dtype and device the model gives it (a tensor still on meta is created on the CPU).
    ``shards``: for a model laid out over processes, the part of each tensor this process holds (see
    ``deepseek_moe.parallel.load_pretrained_sharded``, which builds them from DTensors); only those boxes of the
    files are read. The checkpoint must hold exactly the model's tensors (its config.json describes the same
    shapes); errors name the file and the key. The runtime buffers (MoE bias counts) are reset to zero.
    """
    path = Path(path)
    raw, cfg = read_config(path)
    if format_of_config(raw) is not None:
        raise CheckpointError(f"{path}: a quantised checkpoint loads only with deepseek_moe.from_pretrained")
    files = open_checkpoint(path)
    try:
        # the model decides which MTP modules are read (one built from this config.json has them all)
        blocks, fp8, describe = _stored_blocks(path, raw, cfg.replace(mtp_depth=model.config.mtp_depth), files)
        stream_into(model, blocks, dtype=None, device=torch.device("cpu"), hooks=LoadHooks(), fp8_block=fp8,
                    describe_missing=describe, explain_shape=_explainer(raw),
                    stored_apart=_stored_apart(model.config), shards=shards)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from e
    finally:
        for f in set(files.values()):
            f.close()
    _restore_capacity(model, raw, path)
    if model.tokenizer is None:
        _attach_tokenizer(model, path)


__all__ = ["CONFIG_FILE", "INDEX_FILE", "SINGLE_FILE", "TOKENIZER_FILE", "load_into", "load_pretrained",
           "open_checkpoint", "read_config", "resolve_dtype"]
