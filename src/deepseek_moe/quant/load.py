"""Load quantised checkpoints, and quantise full-precision ones while streaming.

The model is built on the meta device, its targets swapped for empty quantised twins, then materialised
uninitialised; each checkpoint tensor is then read in row chunks (``stfile``, plain reads, no mapping) and
either copied (codes, scales, unquantised tensors) or quantised chunk by chunk into the codes. So the
full-precision model never exists: the peak is the quantised model plus one chunk.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deepseek_moe.io.hf import config_from_hf, hf_fused_to_ours, hf_layer_index, hf_to_ours
from deepseek_moe.io.streaming import CheckpointError
from deepseek_moe.moe.all_layers import moe_layers
from deepseek_moe.quant import pack
from deepseek_moe.quant.apply import prepare_model
from deepseek_moe.quant.config import QUANT_METHOD, QuantConfig, parse_quantize, part_of
from deepseek_moe.quant.format import SCALE_SUFFIX, hf_key_of
from deepseek_moe.quant.modules import QuantLinear, QuantRoutedExperts, effective_bits, quantize_rows
from deepseek_moe.quant.stfile import Entry, SafetensorsReader, row_chunks, write_safetensors

if TYPE_CHECKING:
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def read_hf_config(path: Path) -> tuple[dict[str, Any], QuantConfig | None]:
    """config.json without its quantization_config, and ours parsed (None when absent); other methods refused."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json")
    hf = json.loads(config_file.read_text())
    quant = hf.pop("quantization_config", None)
    if not quant:
        return hf, None
    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise CheckpointError(f"{config_file}: quantization_config method {method!r} is not {QUANT_METHOD!r}; "
                              "only this library's weight-only format loads here")
    try:
        return hf, QuantConfig.from_hf(quant, source=str(config_file))
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def is_quantized_checkpoint(path: str | os.PathLike[str]) -> bool:
    config_file = Path(path) / "config.json"
    return config_file.is_file() and bool(json.loads(config_file.read_text()).get("quantization_config"))


def _readers(path: Path) -> Iterator[tuple[str, SafetensorsReader]]:
    """(key, reader of the file holding it) for every tensor of the checkpoint."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        readers: dict[str, SafetensorsReader] = {}
        for key, name in weight_map.items():
            if name not in readers:
                if not (path / name).is_file():
                    raise CheckpointError(f"{index}: lists shard {name!r}, which does not exist in {path}")
                readers[name] = SafetensorsReader(path / name)
            if key not in readers[name].tensors:
                raise CheckpointError(f"{index}: maps {key!r} to {name}, which does not contain it")
            yield key, readers[name]
        return
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
    reader = SafetensorsReader(single)
    for key in reader.keys():
        yield key, reader


def _resolve_dtype(dtype: torch.dtype | str | None, hf_cfg: dict[str, Any]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32"
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; expected one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


class _Loader:
    """Fills a materialised (uninitialised) model from checkpoint keys, tracking what was filled."""

    def __init__(self, model: nn.Module, path: Path) -> None:
        self.model, self.path = model, path
        self.state = model.state_dict(keep_vars=True)
        self.modules = dict(model.named_modules())
        self.loaded: set[tuple[str, int | None]] = set()

    def required(self, tied: bool) -> set[tuple[str, int | None]]:
        params = {id(p) for p in self.model.parameters()}
        out: set[tuple[str, int | None]] = set()
        for name, t in self.state.items():
            mapped = hf_key_of(name)
            if mapped is None:
                if id(t) in params:
                    raise CheckpointError(f"model parameter {name!r} has no Hugging Face name in io/hf.py")
                continue
            if tied and name == "head.weight":
                continue
            out.update((name, e) for e in range(t.shape[0])) if mapped[1] else out.add((name, None))
        return out

    def _dest(self, name: str, e: int | None, key: str, reader: SafetensorsReader) -> torch.Tensor:
        if name not in self.state:
            raise CheckpointError(f"{reader.path}: unexpected key {key!r} (no {name!r} in this model; is the "
                                  "config right?)")
        dest = self.state[name].data
        if e is not None:
            if not 0 <= e < dest.shape[0]:
                raise CheckpointError(f"{reader.path}: {key!r}: expert {e} out of range for {dest.shape[0]} "
                                      "routed experts")
            dest = dest[e]
        return dest

    def load_key(self, key: str, reader: SafetensorsReader) -> None:
        info = reader.tensors[key]
        if key.endswith(SCALE_SUFFIX):
            mapped = hf_to_ours(key.removesuffix(SCALE_SUFFIX))
            if mapped is None:
                raise CheckpointError(f"{reader.path}: unexpected key {key!r}")
            name = self._quant_name(mapped[0], scale=True)
            if name is None:
                raise CheckpointError(f"{reader.path}: {key!r} is a scale, but {mapped[0]!r} is not quantised in "
                                      "this model (quantization_config.keep disagrees with the tensors)")
            self._copy(name, mapped[1], key, reader, exact_dtype=True)
            return
        mapped = hf_to_ours(key)
        if mapped is None:
            fused = hf_fused_to_ours(key)
            if fused is None:
                raise CheckpointError(f"{reader.path}: unexpected key {key!r} (not a DeepSeek-V2/V3 weight name)")
            self._load_fused(key, fused, reader)
            return
        name, e = mapped
        qname = self._quant_name(name, scale=False)
        if qname is None:
            if info.shape and 0 in info.shape and name not in self.state:
                return  # transformers' zero-width shared experts when n_shared_experts == 0
            self._copy(name, e, key, reader, exact_dtype=False)
        elif info.dtype in (torch.int8, torch.uint8):
            self._copy_codes(qname, e, key, reader)
        else:
            self._quantize_in(qname, e, key, reader)

    def _quant_name(self, name: str, *, scale: bool) -> str | None:
        """Our quantised buffer for the float name ``X.weight`` / ``...experts.w1``, or None if not quantised."""
        owner_name, _, leaf = name.rpartition(".")
        owner = self.modules.get(owner_name)
        if isinstance(owner, QuantLinear) and leaf == "weight":
            return f"{owner_name}.weight_scale" if scale else f"{owner_name}.qweight"
        if isinstance(owner, QuantRoutedExperts) and leaf in ("w1", "w2", "w3"):
            return f"{name}{SCALE_SUFFIX}" if scale else name
        return None

    def _owner(self, qname: str) -> tuple[QuantLinear | QuantRoutedExperts, str]:
        owner_name, _, leaf = qname.rpartition(".")
        owner = self.modules[owner_name]
        assert isinstance(owner, QuantLinear | QuantRoutedExperts)
        return owner, leaf

    def _copy(self, name: str, e: int | None, key: str, reader: SafetensorsReader, *, exact_dtype: bool) -> None:
        info = reader.tensors[key]
        dest = self._dest(name, e, key, reader)
        if tuple(info.shape) != tuple(dest.shape):
            raise CheckpointError(f"{reader.path}: {key!r} has shape {tuple(info.shape)}, expected "
                                  f"{tuple(dest.shape)} (model {name!r})")
        if exact_dtype and info.dtype != dest.dtype:
            raise CheckpointError(f"{reader.path}: {key!r} is {info.dtype}, the format requires {dest.dtype}")
        if not dest.shape:
            dest.copy_(reader.read(key))
        elif info.dtype == dest.dtype and dest.is_contiguous():
            reader.read(key, out=dest)  # straight into the parameter's storage
        else:
            for rows in row_chunks(dest.shape[0], dest[0].numel()):
                dest[rows].copy_(reader.read(key, rows))
        self.loaded.add((name, e))

    def _copy_codes(self, qname: str, e: int | None, key: str, reader: SafetensorsReader) -> None:
        owner, leaf = self._owner(qname)
        info = reader.tensors[key]
        bits = owner.bits if isinstance(owner, QuantLinear) else owner.bits_of(leaf)
        want = torch.int8 if bits == 8 else torch.uint8
        if info.dtype != want:
            raise CheckpointError(f"{reader.path}: {key!r} holds {info.dtype} codes, but this layer is int{bits} "
                                  f"here (expected {want}); is quantization_config right?")
        if bits == 8:
            self._copy(qname, e, key, reader, exact_dtype=True)
            return
        dest = self._dest(qname, e, key, reader)
        if tuple(info.shape) != tuple(dest.shape):
            raise CheckpointError(f"{reader.path}: {key!r} has shape {tuple(info.shape)}, expected "
                                  f"{tuple(dest.shape)}")
        for rows in row_chunks(dest.shape[0], dest.shape[1]):
            dest[rows] = pack.repack_int4_for_kernel(reader.read(key, rows), owner.group_size)
        self.loaded.add((qname, e))

    def _quantize_in(self, qname: str, e: int | None, key: str, reader: SafetensorsReader) -> None:
        owner, leaf = self._owner(qname)
        info = reader.tensors[key]
        rows_total, width = info.shape
        expected = ((owner.out_features, owner.in_features) if isinstance(owner, QuantLinear)
                    else ((owner.dim, owner.inter_dim) if leaf == "w2" else (owner.inter_dim, owner.dim)))
        if (rows_total, width) != expected:
            raise CheckpointError(f"{reader.path}: {key!r} has shape {tuple(info.shape)}, expected {expected}")
        for rows in row_chunks(rows_total, width):
            chunk = reader.read(key, rows)
            if isinstance(owner, QuantLinear):
                owner.load_float_rows(chunk, rows.start)
            else:
                assert e is not None
                owner.load_float_expert(leaf, e, chunk, rows.start)
        scale = f"{qname.removesuffix('.qweight')}.weight_scale" if qname.endswith(".qweight") else qname + SCALE_SUFFIX
        self.loaded.update({(qname, e), (scale, e)})

    def _load_fused(self, key: str, fused: list[str], reader: SafetensorsReader) -> None:
        """transformers-5 fused experts (E, 2F, D) / (E, D, F): one expert at a time."""
        info = reader.tensors[key]
        for e in range(info.shape[0]):
            parts = reader.read(key, slice(e, e + 1))[0].chunk(len(fused), dim=0)
            for name, part in zip(fused, parts, strict=True):
                qname = self._quant_name(name, scale=False)
                if qname is None:
                    self._dest(name, e, key, reader).copy_(part)
                    self.loaded.add((name, e))
                else:
                    owner, leaf = self._owner(qname)
                    assert isinstance(owner, QuantRoutedExperts)
                    owner.load_float_expert(leaf, e, part)
                    self.loaded.update({(qname, e), (qname + SCALE_SUFFIX, e)})


def load_quantized(path: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None,
                   quantize: str | int | QuantConfig | None = None,
                   device: str | torch.device = "cpu") -> DeepSeekMoEForCausalLM:
    """A quantised model from a quantised checkpoint, or from a full-precision one quantised while streaming.

    ``dtype``: of the unquantised parts (embedding, norms, kept parts) and of the activations; None: the config's.
    ``quantize``: "int8" / "int4" / a QuantConfig; on an already-quantised checkpoint the same bits are a no-op
    and other bits an error.
    """
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

    if torch.device(device).type != "cpu":
        raise ValueError(f"quantised models run on the CPU (device {device!r} asked)")
    path = Path(path)
    hf_cfg, stored = read_hf_config(path)
    asked = parse_quantize(quantize)
    if stored is not None and asked is not None and (asked.bits, asked.group_size) != (stored.bits,
                                                                                      stored.group_size):
        raise ValueError(f"{path} is already quantised to int{stored.bits} (group {stored.group_size}); "
                         f"re-quantising to int{asked.bits} would compound the rounding error: quantise the "
                         "full-precision checkpoint instead")
    qcfg = stored or asked
    if qcfg is None:
        raise ValueError(f"{path}: not a quantised checkpoint and no quantize= given")
    cfg = config_from_hf(hf_cfg, source=str(path / "config.json"))
    torch_dtype = _resolve_dtype(dtype, hf_cfg)

    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(cfg)
    for name, param in model.named_parameters():
        if ".ffn.gate." not in name:  # the router stays float32 (its logits decide which experts run)
            param.data = param.data.to(torch_dtype)
    prepare_model(model, qcfg, dtype=torch_dtype)
    model.to_empty(device="cpu")
    for _, moe in moe_layers(model):
        moe.bias_counts.zero_()
    if cfg.tie_word_embeddings:
        model.head.weight = model.embed.weight

    loader = _Loader(model, path)
    with torch.no_grad():
        for key, reader in _readers(path):
            if key.endswith("_scale_inv"):
                raise CheckpointError(f"{reader.path}: {key!r} is an FP8 scale: dequantise FP8 checkpoints first")
            layer = hf_layer_index(key)
            if (layer is not None and layer >= cfg.n_layers) or key.endswith(_IGNORED_SUFFIXES):
                continue
            if cfg.tie_word_embeddings and key == "lm_head.weight":
                continue
            loader.load_key(key, reader)
    missing = loader.required(cfg.tie_word_embeddings) - loader.loaded
    if missing:
        keys = sorted(_hf_name(n, e) for n, e in missing)
        shown = ", ".join(map(repr, keys[:8])) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise CheckpointError(f"checkpoint {path} is missing key(s) {shown}")
    tokenizer_file = path / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        model.tokenizer = Tokenizer.from_file(str(tokenizer_file))
    return model.eval()


def _hf_name(name: str, e: int | None) -> str:
    mapped = hf_key_of(name)
    assert mapped is not None
    return mapped[0].replace("{e}", str(e)) if e is not None else mapped[0]


# ----------------------------------------------------------------------------------------------------------
# Checkpoint -> checkpoint


def _ours_for_key(key: str) -> tuple[str, int | None] | None:
    return hf_to_ours(key)


def _copied(reader: SafetensorsReader, key: str) -> Iterator[torch.Tensor]:
    shape = reader.tensors[key].shape
    if len(shape) == 0:
        yield reader.read(key).reshape(1)
        return
    for rows in row_chunks(shape[0], math.prod(shape[1:])):
        yield reader.read(key, rows)


def _quantized(reader: SafetensorsReader, key: str, bits: int, group_size: int, scales: list[torch.Tensor]
               ) -> Iterator[torch.Tensor]:
    """Codes in the portable layout, chunk by chunk; each chunk's scales are appended to ``scales``, which the
    scale entry written right after yields (so each weight is read and quantised once)."""
    n, k_in = reader.tensors[key].shape
    for rows in row_chunks(n, k_in):
        codes, scale = quantize_rows(reader.read(key, rows), bits, group_size)
        scales.append(scale)
        yield codes if bits == 8 else pack.portable_from_kernel_layout(codes, group_size)


def quantize_checkpoint(src: str | os.PathLike[str], out: str | os.PathLike[str], qcfg: QuantConfig) -> Path:
    """Write ``out``, the quantised form of checkpoint ``src``, reading ``src`` in row chunks (never whole).

    Returns ``out``. An already-quantised ``src`` with the same bits is copied; other bits are an error.
    """
    src, out = Path(src), Path(out)
    hf_cfg, stored = read_hf_config(src)
    if stored is not None:
        if (stored.bits, stored.group_size) != (qcfg.bits, qcfg.group_size):
            raise ValueError(f"{src} is already quantised to int{stored.bits} (group {stored.group_size}); "
                             f"re-quantising to int{qcfg.bits} would compound the rounding error: quantise the "
                             "full-precision checkpoint instead")
        if src.resolve() != out.resolve():
            shutil.copytree(src, out, dirs_exist_ok=True)
        return out
    cfg = config_from_hf(hf_cfg, source=str(src / "config.json"))
    entries: list[Entry] = []
    for key, reader in _readers(src):
        info = reader.tensors[key]
        mapped = _ours_for_key(key)
        if hf_fused_to_ours(key) is not None:
            raise CheckpointError(f"{reader.path}: {key!r}: transformers' fused expert tensors are not supported "
                                  "by quantize; load and save_pretrained the model first")
        part = part_of(mapped[0]) if mapped is not None else None
        tied_head = cfg.tie_word_embeddings and key == "lm_head.weight"
        if part is None or part in qcfg.keep or tied_head or len(info.shape) != 2 or not info.dtype.is_floating_point:
            entries.append(Entry(key, info.dtype, info.shape, partial(_copied, reader, key)))
            continue
        n, k_in = info.shape
        bits = effective_bits(qcfg.bits, k_in, qcfg.group_size)
        scales: list[torch.Tensor] = []
        codes = partial(_quantized, reader, key, bits, qcfg.group_size, scales)
        if bits == 8:
            entries.append(Entry(key, torch.int8, (n, k_in), codes))
            entries.append(Entry(key + SCALE_SUFFIX, pack.INT8_SCALE_DTYPE, (n,), partial(iter, scales)))
        else:
            entries.append(Entry(key, torch.uint8, (n, k_in // 2), codes))
            entries.append(Entry(key + SCALE_SUFFIX, pack.INT4_SCALE_DTYPE, (n, k_in // qcfg.group_size),
                                 partial(iter, scales)))
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", entries)
    hf_out = dict(hf_cfg)
    hf_out["quantization_config"] = qcfg.to_hf()
    (out / "config.json").write_text(json.dumps(hf_out, indent=2, sort_keys=True) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return out
