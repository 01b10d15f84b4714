"""Adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``, as PEFT >= 0.18 writes
them for transformers' DeepseekV2/V3 models, so that either side loads the other's.

Keys are ``base_model.model.<transformers module>.lora_{A,B}.weight``. A Linear's A is (r, in), B (out, r).
Routed experts are PEFT ``target_parameters``, the 3-D ``mlp.experts.gate_up_proj`` (E, 2F, D) and
``mlp.experts.down_proj`` (E, D, F): PEFT wraps the first parameter of the module (gate_up_proj) innermost, so
its pair is under ``experts.base_layer.`` and down_proj's under ``experts.``; each A is (E*r, in) with expert e's
rows at e*r.., each B (out, r*E) with expert e's column k at k*E + e (PEFT's ``ParamWrapper``).

PEFT 0.21 on transformers 5 rewrites any ``target_modules`` entry ending in gate_proj, up_proj or down_proj of
a DeepSeek model into the routed experts' parameters (its v4 -> v5 MoE conversion), so the shared experts and
dense FFNs, which are such Linears, cannot be targeted through PEFT there: we write and read them, but PEFT
refuses such an adapter on that model. Attention, routed experts and the head load both ways.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deepseek_moe.adapters.config import LoRAConfig
from deepseek_moe.adapters.lora import ExpertLoRA, LoRALinear, QuantLoRALinear, expert_dims
from deepseek_moe.adapters.targets import apply_lora, lora_modules
from deepseek_moe.io.hf import hf_to_ours, ours_to_hf
from deepseek_moe.moe.experts import RoutedExperts
from deepseek_moe.quant.modules import QuantLinear, QuantRoutedExperts

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def hf_module_name(name: str) -> str:
    """transformers' module name for our module ``name`` (``layers.1.attn.wkv_b`` -> ``model.layers.1.self_attn.
    kv_b_proj``; ``layers.1.ffn.experts`` -> ``model.layers.1.mlp.experts``)."""
    if name.endswith(".ffn.experts"):
        return "model." + name.replace(".ffn.experts", ".mlp.experts")
    found = ours_to_hf(f"{name}.weight")
    if found is None:
        raise ValueError(f"module {name} has no transformers counterpart, so it cannot be saved in PEFT's format")
    return found[0].removesuffix(".weight")


def our_module_name(hf_name: str) -> str:
    found = hf_to_ours(f"{hf_name}.weight")
    if found is None or found[1] is not None:
        raise ValueError(f"PEFT target {hf_name!r} is no module of our model")
    return found[0].removesuffix(".weight")


def _pack_A(A_Erd: torch.Tensor) -> torch.Tensor:
    E, r, d = A_Erd.shape
    return A_Erd.reshape(E * r, d)


def _pack_B(B_Eor: torch.Tensor) -> torch.Tensor:
    """(E, out, r) -> PEFT's (out, r*E), column k*E + e."""
    return B_Eor.permute(1, 2, 0).reshape(B_Eor.shape[1], -1)


def _unpack_A(A: torch.Tensor, E: int) -> torch.Tensor:
    return A.reshape(E, A.shape[0] // E, A.shape[1])


def _unpack_B(B: torch.Tensor, E: int) -> torch.Tensor:
    return B.reshape(B.shape[0], B.shape[1] // E, E).permute(2, 0, 1)


def adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(tensors by PEFT key, target_modules, target_parameters) of every adapter in the model."""
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    parameters: list[str] = []
    for name, adapter in lora_modules(model).items():
        hf = hf_module_name(name)
        if isinstance(adapter, ExpertLoRA):
            pairs = {f"{hf}.base_layer": (adapter.gate_up_A, adapter.gate_up_B), hf: (adapter.down_A, adapter.down_B)}
            for key, (A, B) in pairs.items():
                tensors[f"{PREFIX}{key}.lora_A.weight"] = _pack_A(A.detach())
                tensors[f"{PREFIX}{key}.lora_B.weight"] = _pack_B(B.detach())
            parameters += [f"{hf}.gate_up_proj", f"{hf}.down_proj"]
        else:
            tensors[f"{PREFIX}{hf}.lora_A.weight"] = adapter.lora_A.detach()
            tensors[f"{PREFIX}{hf}.lora_B.weight"] = adapter.lora_B.detach()
            modules.append(hf)
    return {k: v.contiguous() for k, v in tensors.items()}, modules, parameters


def save_adapter(model: nn.Module, path: str | os.PathLike[str], cfg: LoRAConfig, *,
                 base_model: str | None = None) -> Path:
    """Write the model's adapters to the directory ``path`` in PEFT's format (each file written whole, then
    renamed into place). ``cfg``: the rank, alpha, dropout and rsLoRA they were made with."""
    tensors, modules, parameters = adapter_state(model)
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save (apply_lora first)")
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
        "target_modules": sorted(modules), "target_parameters": parameters or None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILE)
    tmp = out / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / CONFIG_FILE)
    return out


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name it ends (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?(?:{key})\Z", name):
            return value
    return default


def read_adapter_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (is this a PEFT adapter directory?)")
    config: dict[str, Any] = json.loads(file.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type {config.get('peft_type')!r}: only LORA adapters are read")
    for field, value in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if config.get(field, value) != value:
            raise ValueError(f"{file}: {field} {config.get(field)!r} is not supported (only {value!r})")
    return config


def load_adapter(model: nn.Module, path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32) -> list[str]:
    """Add the adapters stored at ``path`` (PEFT's format, ours or PEFT's own) to ``model``, unmerged; returns
    the names of the modules adapted. Ranks come from the tensors, scales from lora_alpha / alpha_pattern."""
    path = Path(path)
    config = read_adapter_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}")
    tensors = {k.removeprefix(PREFIX): v for k, v in load_file(str(weights)).items()}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        full = re.fullmatch(r"(.+)\.base_layer\.weight", key)
        if full is not None:  # PEFT saves lm_head's whole weight beside its pair ("embedding layers")
            _check_base_copy(model, full.group(1), t, weights)
            continue
        m = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.default)?\.weight", key)
        if m is None:
            raise ValueError(f"{weights}: key {PREFIX}{key} is no LoRA tensor (lora_A/lora_B weights only)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    alpha, use_rslora, dropout = float(config["lora_alpha"]), bool(config.get("use_rslora")), 0.0

    def cfg_for(hf_name: str, rank: int) -> LoRAConfig:
        a = float(_pattern_value(config.get("alpha_pattern") or {}, hf_name, alpha))
        return LoRAConfig(r=rank, alpha=a, dropout=dropout, use_rslora=use_rslora)

    adapted = []
    experts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for hf_name, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{weights}: {hf_name} has {sorted(pair)}, needs both lora_A and lora_B")
        if hf_name.endswith(".mlp.experts") or hf_name.endswith(".mlp.experts.base_layer"):
            experts.setdefault(hf_name.removesuffix(".base_layer"), {})[hf_name] = pair
            continue
        name = our_module_name(hf_name)
        rank = pair["lora_A"].shape[0]
        apply_lora(model, cfg_for(hf_name, rank), targets=(name,), dtype=dtype)
        module = model.get_submodule(name)
        assert isinstance(module, LoRALinear | QuantLoRALinear)
        _copy(module.lora_A, pair["lora_A"], f"{hf_name}.lora_A")
        _copy(module.lora_B, pair["lora_B"], f"{hf_name}.lora_B")
        adapted.append(name)
    for hf_name, parts in experts.items():
        adapted.append(_load_experts(model, hf_name, parts, config, cfg_for, dtype))
    return adapted


def _expert_params(config: dict[str, Any], hf_name: str) -> list[str]:
    """Which of gate_up_proj / down_proj the adapter's target_parameters name for this experts module, in the
    module's parameter order (PEFT's nesting order)."""
    named = []
    for param in ("gate_up_proj", "down_proj"):
        key = f"{hf_name}.{param}"
        if any(key == t or key.endswith("." + t) for t in config.get("target_parameters") or []):
            named.append(param)
    return named


def _load_experts(model: nn.Module, hf_name: str, parts: dict[str, dict[str, torch.Tensor]], config: dict[str, Any],
                  cfg_for: Any, dtype: torch.dtype) -> str:
    m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts", hf_name)
    if m is None:
        raise ValueError(f"PEFT target {hf_name!r} is no routed-experts module of our model")
    name = f"layers.{m.group(1)}.ffn.experts"
    experts = model.get_submodule(name)
    if not isinstance(experts, RoutedExperts | QuantRoutedExperts):
        raise ValueError(f"PEFT target {hf_name!r}: our {name} is no routed-experts module")
    if experts.adapter is not None:
        raise ValueError(f"{name} already has a LoRA adapter: merge it (merge_lora) before adding another")
    params = _expert_params(config, hf_name)
    # PEFT nests one wrapper per parameter: the first (gate_up_proj) innermost, under base_layer.
    keys = [f"{hf_name}.base_layer", hf_name] if len(params) == 2 else [hf_name]
    if set(parts) != set(keys):
        raise ValueError(f"{hf_name}: the adapter's tensors ({sorted(parts)}) do not match its target_parameters "
                         f"({params})")
    E = expert_dims(experts)[0]
    by_param = {param: parts[key] for param, key in zip(params, keys, strict=True)}
    ranks = {param: pair["lora_A"].shape[0] // E for param, pair in by_param.items()}
    adapter = ExpertLoRA(experts, cfg_for(f"{hf_name}.gate_up_proj", ranks.get("gate_up_proj", 1)),
                         down=cfg_for(f"{hf_name}.down_proj", ranks.get("down_proj", 1)), dtype=dtype)
    with torch.no_grad():  # a projection the adapter does not name keeps a zero pair: no update there
        for p in adapter.parameters():
            p.zero_()
    for param, (A, B) in {"gate_up_proj": (adapter.gate_up_A, adapter.gate_up_B),
                          "down_proj": (adapter.down_A, adapter.down_B)}.items():
        if param in by_param:
            _copy(A, _unpack_A(by_param[param]["lora_A"], E), f"{hf_name}.{param} lora_A")
            _copy(B, _unpack_B(by_param[param]["lora_B"], E), f"{hf_name}.{param} lora_B")
    experts.adapter = adapter
    return name


def _check_base_copy(model: nn.Module, hf_name: str, value: torch.Tensor, file: Path) -> None:
    """A base weight the adapter carries must be the base's own: we adapt, we do not replace weights. A quantised
    base holds its weight rounded, so it is compared within the rounding: one code step of its row."""
    module = model.get_submodule(our_module_name(hf_name))
    if isinstance(module, QuantLinear):
        weight = module.weight
        step = module.weight_scale.float().amax(dim=-1, keepdim=True) if weight.shape == value.shape else None
        if step is None or not bool(((weight.float() - value.float()).abs() <= step).all()):
            raise ValueError(f"{file}: {hf_name}.base_layer.weight differs from the base model's {hf_name}.weight "
                             "by more than its quantisation (an adapter for another base, or one that resized "
                             "the vocabulary)")
        return
    weight = model.get_parameter(our_module_name(hf_name) + ".weight")
    if weight.shape != value.shape or not torch.allclose(weight.detach().float(), value.float(), atol=1e-6):
        raise ValueError(f"{file}: {hf_name}.base_layer.weight differs from the base model's {hf_name}.weight "
                         "(an adapter for another base, or one that resized the vocabulary)")


def _copy(param: nn.Parameter, value: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"adapter tensor {what} has shape {tuple(value.shape)}, the model needs "
                         f"{tuple(param.shape)} (an adapter for another base?)")
    with torch.no_grad():
        param.copy_(value)
