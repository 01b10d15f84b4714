"""A config whose shapes disagree with the tensors is refused from the safetensors headers alone, before any
storage is allocated: the error names the config field and the tensor, and the peak resident memory of the
process (VmHWM, measured in a child) grows by under 100 MB even when the config would have the loader allocate
terabytes. The table that names the fields (io/shapes.py) is checked against the model itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.io import save_pretrained
from deepseek_moe.io.shapes import dim_fields, field_value
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.quant import QuantConfig, quantize_checkpoint


def _cfg(**changes: Any) -> ModelConfig:
    moe = MoEConfig(dim=64, moe_inter_dim=32, n_routed_experts=8, n_activated_experts=2, n_shared_experts=1)
    fields: dict[str, Any] = {"q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                              "v_head_dim": 8, **changes}
    return ModelConfig(vocab_size=96, dim=64, inter_dim=96, n_layers=3, n_dense_layers=1, n_heads=2, moe=moe,
                       max_seq_len=64, original_seq_len=64, **fields)


# config.json key -> (a wrong value, the field the error must name). Each variant changes one key.
MISMATCHES: dict[str, tuple[str, int, str]] = {
    "hidden": ("hidden_size", 96, "hidden_size"),
    "vocab": ("vocab_size", 128, "vocab_size"),
    "more experts": ("n_routed_experts", 16, "n_routed_experts"),
    "fewer experts": ("n_routed_experts", 4, "n_routed_experts"),
    "expert width": ("moe_intermediate_size", 48, "moe_intermediate_size"),
    "dense width": ("intermediate_size", 64, "intermediate_size"),
    "kv_lora_rank": ("kv_lora_rank", 32, "kv_lora_rank"),
    "q_lora_rank": ("q_lora_rank", 32, "q_lora_rank"),
    "heads": ("num_attention_heads", 4, "num_attention_heads"),
    "rope dim": ("qk_rope_head_dim", 16, "qk_rope_head_dim"),
    "nope dim": ("qk_nope_head_dim", 16, "qk_nope_head_dim"),
    "v dim": ("v_head_dim", 16, "v_head_dim"),
    "shared experts": ("n_shared_experts", 2, "n_shared_experts"),
    "layers": ("num_hidden_layers", 5, "num_hidden_layers"),
    # Inflated: a terabyte and more if allocated before the check.
    "huge vocab": ("vocab_size", 10**10, "vocab_size"),
    "huge hidden": ("hidden_size", 10**8, "hidden_size"),
    "huge experts": ("n_routed_experts", 10**8, "n_routed_experts"),
    "huge expert width": ("moe_intermediate_size", 10**9, "moe_intermediate_size"),
    "huge layers": ("num_hidden_layers", 10**7, "num_hidden_layers"),
}
# The same against a checkpoint stored quantised (int4 codes and scales are checked too), and a float one
# quantised while loading.
QUANT_MISMATCHES = {f"int4 stored, {k}": v for k, v in MISMATCHES.items()
                    if k in ("expert width", "dense width", "huge expert width", "heads", "huge vocab")}
QUANTIZE_MISMATCHES = {f"quantize=int8, {k}": v for k, v in MISMATCHES.items()
                       if k in ("expert width", "huge expert width", "huge hidden")}

CHILD = r"""
import json, sys
import deepseek_moe
from deepseek_moe.io import CheckpointError

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

cases = json.loads(sys.argv[1])
for name, (path, quantize) in cases.items():  # the good checkpoints once: every lazy import done
    if name.startswith("ok"):
        deepseek_moe.from_pretrained(path, quantize=quantize)
before = hwm()
errors = {}
for name, (path, quantize) in cases.items():
    if name.startswith("ok"):
        continue
    try:
        deepseek_moe.from_pretrained(path, quantize=quantize)
        errors[name] = "loaded"
    except CheckpointError as e:
        errors[name] = "CheckpointError: " + str(e)
    except BaseException as e:
        errors[name] = type(e).__name__ + ": " + str(e)[:300]
print(json.dumps({"growth": hwm() - before, "errors": errors}))
"""


def _variant(src: Path, dst: Path, key: str, value: int) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        os.link(f, dst / f.name)  # the same tensors
    raw = json.loads((src / "config.json").read_text())
    raw[key] = value
    if key == "num_attention_heads":
        raw["num_key_value_heads"] = value  # MLA requires them equal
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("shapes")
    torch.manual_seed(0)
    save_pretrained(DeepSeekMoEForCausalLM(_cfg()), root / "float")
    quantize_checkpoint(root / "float", root / "int4", QuantConfig(bits=4))
    cases: dict[str, tuple[str, str | None]] = {"ok float": (str(root / "float"), None),
                                                "ok int4": (str(root / "int4"), None)}
    # 10^8 experts and no router weights to show it: refused before the experts are enumerated.
    no_router = _variant(root / "float", root / "no_router", "n_routed_experts", 10**8)
    tensors = load_file(no_router / "model.safetensors")
    (no_router / "model.safetensors").unlink()
    save_file({k: v for k, v in tensors.items() if not k.endswith("mlp.gate.weight")}, no_router / "model.safetensors")
    cases["huge experts, no router"] = (str(no_router), None)
    for table, src, quantize in ((MISMATCHES, "float", None), (QUANT_MISMATCHES, "int4", None),
                                 (QUANTIZE_MISMATCHES, "float", "int8")):
        for name, (key, value, _) in table.items():
            path = _variant(root / src, root / f"v{len(cases)}", key, value)
            cases[name] = (str(path), quantize)
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


ALL = {**MISMATCHES, **QUANT_MISMATCHES, **QUANTIZE_MISMATCHES,
       "huge experts, no router": ("n_routed_experts", 10**8, "n_routed_experts")}


@pytest.mark.parametrize("case", list(ALL))
def test_mismatch_is_refused_naming_the_field_and_the_tensor(refused: dict[str, Any], case: str) -> None:
    message = refused["errors"][case]
    _, _, field = ALL[case]
    assert message.startswith("CheckpointError: "), message
    assert field in message, message
    if field != "num_hidden_layers":  # a layer count is about the whole checkpoint, not one tensor
        assert any(w in message for w in ("has shape", "out of range", "missing")), message
        assert "'model." in message, message  # the checkpoint key


def test_refusals_grow_peak_memory_by_under_100_mb(refused: dict[str, Any]) -> None:
    assert refused["growth"] < 100e6, f"VmHWM grew {refused['growth'] / 1e6:.1f} MB"


@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": 0, "attention_bias": True}, {"attention": "mha",
                                     "kv_lora_rank": 0, "qk_nope_head_dim": 0, "qk_rope_head_dim": 32,
                                     "v_head_dim": 32, "q_lora_rank": 0}])
def test_field_table_matches_the_model(changes: dict[str, Any]) -> None:
    cfg = _cfg(**changes)
    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(cfg)
    for name, tensor in model.state_dict().items():
        fields = dim_fields(name)
        assert fields is not None, name
        shape = tuple(tensor.shape[1:]) if ".ffn.experts." in name else tuple(tensor.shape)
        assert tuple(field_value(f, cfg) for f in fields) == shape, name
