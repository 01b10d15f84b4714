"""The language model as two ONNX graphs, prefill and decode, with the latent cache as explicit tensors.

Files written by :func:`export_language_model` into OUT_DIR (all names are also in ``export.json``):

``prefill.onnx``
    inputs  ``input_ids`` int64 (batch, seq); ``attention_mask`` int64 (batch, seq), 1 for real tokens and 0
            for left padding.
    outputs ``logits`` float32 (batch, seq, vocab); per layer i, ``present.{i}.c_kv`` (batch, seq,
            kv_lora_rank), the RMS-normalised KV latent, and ``present.{i}.k_pe`` (batch, seq,
            qk_rope_head_dim), the shared RoPE'd key (MHA models: ``present.{i}.k`` (batch, seq, heads,
            qk_head_dim) and ``present.{i}.v`` (batch, seq, heads, v_head_dim)).
``decode.onnx``
    inputs  ``input_ids`` (batch, seq) (one new token per row when generating); ``attention_mask`` (batch,
            past_seq + seq), the mask of every slot, past and new; ``past.{i}.c_kv`` / ``past.{i}.k_pe``
            shaped as the presents above with past_seq slots.
    outputs ``logits`` (batch, seq, vocab) and ``present.{i}.*`` with past_seq + seq slots: feed them back as
            the next step's ``past.{i}.*``.

Positions are counted from the mask (real tokens only), as the PyTorch model does, so left-padded batches
give each row the result it would get alone. ``--int8`` adds ``prefill.int8.onnx`` and ``decode.int8.onnx``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepseek_moe.export.cache import TensorKVCache
from deepseek_moe.export.errors import ExportError
from deepseek_moe.export.moe import dense_moe_layers
from deepseek_moe.export.onnx import (
    DEFAULT_OPSET,
    EXTERNAL_DATA_BYTES,
    export_graph,
    name_dims,
    staged_directory,
)
from deepseek_moe.export.quantize import quantize_int8
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM, attention_mask_4d, positions_of

FORMAT_VERSION = 1


def cache_names(model: DeepSeekMoEForCausalLM) -> list[str]:
    """Per-layer cached tensor names in the order ``LayerCache.append`` receives them."""
    return ["c_kv", "k_pe"] if model.config.attention == "mla" else ["k", "v"]


def lm_logits(model: DeepSeekMoEForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              cache: TensorKVCache) -> torch.Tensor:
    """``model(input_ids, attention_mask=..., cache=...).logits`` as a graph: the model's own
    ``forward_logits``, with the masks always built. ``forward``'s shortcuts (a mask of all ones dropped, the
    max_seq_len check) read tensor values, which a graph serving padded and unpadded batches alike cannot
    (tests/export/test_lm_forward.py: equal to the model's forward)."""
    T = input_ids.shape[1]
    new_mask = attention_mask.to(torch.bool)
    key_mask = cache.extend_mask(new_mask)  # (B, S)
    # token_mask: padding's MoE output is 0, as in the model
    return model.forward_logits(input_ids, positions_of(key_mask, T), attention_mask_4d(key_mask, T),
                                cache, token_mask=new_mask)  # type: ignore[arg-type]  # KVCache's interface


class PrefillGraph(nn.Module):
    def __init__(self, model: DeepSeekMoEForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = TensorKVCache([() for _ in self.model.layers])
        logits = lm_logits(self.model, input_ids, attention_mask, cache)
        return (logits, *cache.present())


class DecodeGraph(nn.Module):
    def __init__(self, model: DeepSeekMoEForCausalLM) -> None:
        super().__init__()
        self.model = model
        self.n_cached = len(cache_names(model))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = self.n_cached
        pasts = [tuple(past[i:i + n]) for i in range(0, len(past), n)]
        S_past = past[0].shape[1]
        cache = TensorKVCache(pasts, attention_mask[:, :S_past].to(torch.bool))
        logits = lm_logits(self.model, input_ids, attention_mask[:, S_past:], cache)
        return (logits, *cache.present())


def _example_cache(model: DeepSeekMoEForCausalLM, B: int, T: int) -> list[torch.Tensor]:
    with torch.no_grad():
        ids = torch.randint(0, model.config.vocab_size, (B, T))
        return list(PrefillGraph(model)(ids, torch.ones(B, T, dtype=torch.long))[1:])


def export_language_model(model: DeepSeekMoEForCausalLM, out_dir: str | os.PathLike[str], *, int8: bool = False,
                          tokenizer_file: str | os.PathLike[str] | None = None,
                          opset_version: int = DEFAULT_OPSET) -> Path:
    """Write ``prefill.onnx``, ``decode.onnx`` (and their int8 versions with ``int8``), ``export.json`` and the
    tokenizer into ``out_dir``. All files appear together or, on any failure, not at all."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    clashes = [n for n in ("prefill.onnx", "decode.onnx") if (out_dir / n).exists()]
    if clashes:
        raise ExportError(f"{out_dir} already holds {', '.join(clashes)}; choose an empty directory")
    if not isinstance(model, DeepSeekMoEForCausalLM):
        raise ExportError(f"expected a DeepSeekMoEForCausalLM, got {type(model).__name__}; use to_onnx for "
                          "other modules")
    for name, p in model.named_parameters():
        if p.dtype != torch.float32:
            raise ExportError(f"parameter {name} is {p.dtype}; export a float32 model (model.float())")
    names = cache_names(model)
    n_layers = len(model.layers)
    past = [f"past.{i}.{n}" for i in range(n_layers) for n in names]
    present = [f"present.{i}.{n}" for i in range(n_layers) for n in names]
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = n_bytes > EXTERNAL_DATA_BYTES
    # Named dims are asserted equal wherever they appear (every past tensor shares past_seq); the mask's
    # length (past_seq + seq) is left for the exporter to derive.
    batch, seq, past_seq = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past_seq")
    was_training = model.training
    model.eval()
    try:
        with dense_moe_layers(model), staged_directory(out_dir) as stage:
            # Example sizes above 1: the exporter specialises dims it sees as 0 or 1.
            ids = torch.randint(0, model.config.vocab_size, (2, 3))
            mask = torch.ones(2, 3, dtype=torch.long)
            batch_seq = {0: batch, 1: seq}
            export_graph(PrefillGraph(model), stage / "prefill.onnx", (ids, mask),
                         input_names=["input_ids", "attention_mask"], output_names=["logits", *present],
                         dynamic_shapes=(batch_seq, batch_seq), opset_version=opset_version,
                         external_data=external)
            cache = _example_cache(model, 2, 3)
            step_mask = torch.ones(2, 5, dtype=torch.long)
            export_graph(DecodeGraph(model), stage / "decode.onnx", (ids[:, :2], step_mask, *cache),
                         input_names=["input_ids", "attention_mask", *past], output_names=["logits", *present],
                         dynamic_shapes=(batch_seq, {0: batch, 1: torch.export.Dim.AUTO},
                                         tuple({0: batch, 1: past_seq} for _ in cache)),  # *past: one tuple
                         opset_version=opset_version, external_data=external)
            name_dims(stage / "decode.onnx", {"attention_mask": [None, "total_seq"]})
            files = {"prefill": "prefill.onnx", "decode": "decode.onnx"}
            if int8:
                for kind in ("prefill", "decode"):
                    quantize_int8(stage / f"{kind}.onnx", stage / f"{kind}.int8.onnx")
                    files[f"{kind}_int8"] = f"{kind}.int8.onnx"
            if tokenizer_file is not None and Path(tokenizer_file).is_file():
                shutil.copyfile(tokenizer_file, stage / "tokenizer.json")
                files["tokenizer"] = "tokenizer.json"
            (stage / "export.json").write_text(json.dumps(_manifest(model, names, files), indent=2) + "\n")
    finally:
        model.train(was_training)
    return out_dir


def _manifest(model: DeepSeekMoEForCausalLM, names: list[str], files: dict[str, str]) -> dict[str, Any]:
    cfg = model.config
    return {
        "format_version": FORMAT_VERSION,
        "files": files,
        "n_layers": cfg.n_layers,
        "cache": {"per_layer": names, "past": "past.{layer}.{name}", "present": "present.{layer}.{name}",
                  "layout": "(batch, seq, ...), dim 1 the sequence axis"},
        "vocab_size": cfg.vocab_size,
        "max_seq_len": cfg.max_seq_len,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "attention": cfg.attention,
    }
