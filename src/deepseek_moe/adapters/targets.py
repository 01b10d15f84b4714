"""Which modules a LoRAConfig adapts, adding and merging the adapters, and freezing all but them.

Groups (our module names; {i} a layer):
    attention        every Linear of layers.{i}.attn (wq or wq_a/wq_b, wkv_a, wkv_b, wo; MHA's wq/wk/wv/wo)
    shared_experts   layers.{i}.ffn.shared_experts.{w1,w2,w3}
    routed_experts   layers.{i}.ffn.experts (a per-expert pair, adapters/lora.py)
    dense_ffn        layers.{i}.ffn.{w1,w2,w3} of the dense layers
    head             head
The router (``ffn.gate``) is no target: it is trained whole, or frozen (:func:`mark_trainable`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from deepseek_moe.adapters.config import DEFAULT_TARGETS, GROUPS, LoRAConfig
from deepseek_moe.adapters.lora import ExpertLoRA, LoRALinear, QuantLoRALinear
from deepseek_moe.moe.experts import RoutedExperts
from deepseek_moe.nn.linear import Linear
from deepseek_moe.quant.modules import QuantLinear, QuantRoutedExperts

# What LoRA adapts: float or quantised (a quantised base keeps its codes frozen; its adapters are float).
_LINEAR = (Linear, QuantLinear)
_EXPERTS = (RoutedExperts, QuantRoutedExperts)

_GROUP_PATTERNS = {
    "attention": re.compile(r"layers\.\d+\.attn\.\w+\Z"),
    "shared_experts": re.compile(r"layers\.\d+\.ffn\.shared_experts\.w[123]\Z"),
    "routed_experts": re.compile(r"layers\.\d+\.ffn\.experts\Z"),
    "dense_ffn": re.compile(r"layers\.\d+\.ffn\.w[123]\Z"),
    "head": re.compile(r"head\Z"),
}


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Every module LoRA can adapt: the Linears and the stacked routed experts (float or quantised), by name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, _LINEAR + _EXPERTS) and name}


def resolve_targets(model: nn.Module, targets: tuple[str, ...] | None) -> list[str]:
    """The names of the modules ``targets`` select, in model order. ``None``: the default groups the model has
    (a model without dense layers simply has no dense_ffn). A target given explicitly that matches nothing is an
    error naming it."""
    candidates = _candidates(model)
    strict = targets is not None
    chosen: set[str] = set()
    for target in targets if targets is not None else DEFAULT_TARGETS:
        if target in GROUPS:
            hits = {n for n in candidates if _GROUP_PATTERNS[target].match(n)}
        else:
            hits = {n for n in candidates if n == target or n.endswith("." + target)}
        if not hits and strict:
            kind = "group" if target in GROUPS else "module name"
            raise ValueError(f"LoRA target {target!r} ({kind}) matches no module of this model; groups are "
                             f"{', '.join(GROUPS)}, module names are ours (e.g. layers.0.attn.wo, wkv_b, experts)")
        chosen |= hits
    return [n for n in candidates if n in chosen]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def apply_lora(model: nn.Module, cfg: LoRAConfig | None = None, *, targets: tuple[str, ...] | None = None,
               dtype: torch.dtype = torch.float32) -> list[str]:
    """Add a LoRA pair to each module the targets select (``targets`` overrides ``cfg.targets``); returns their
    names. The base is left as it was: with zero-initialised B the logits are unchanged, bit for bit."""
    cfg = cfg or LoRAConfig()
    names = resolve_targets(model, targets if targets is not None else _explicit(cfg))
    if "head" in names and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        raise ValueError("LoRA target 'head' on a model with tie_word_embeddings: the head's weight is the "
                         "embedding's, so merging would change the embedding too; leave 'head' out")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear | QuantLoRALinear) or (
                isinstance(module, _EXPERTS) and module.adapter is not None):
            raise ValueError(f"{name} already has a LoRA adapter: merge it (merge_lora) before adding another")
        if isinstance(module, _EXPERTS):
            if hasattr(module.w1, "to_local"):
                raise ValueError(f"{name}: LoRA on expert-parallel (DTensor) experts is not supported")
            module.adapter = ExpertLoRA(module, cfg, dtype=dtype)
        else:
            parent, child = _parent(model, name)
            if isinstance(module, QuantLinear):
                setattr(parent, child, QuantLoRALinear(module, cfg, dtype=dtype))
            else:
                assert isinstance(module, Linear)  # _candidates
                setattr(parent, child, LoRALinear(module, cfg, dtype=dtype))
    return names


def _explicit(cfg: LoRAConfig) -> tuple[str, ...] | None:
    """The default targets are lenient (groups the model lacks are skipped), explicit ones strict."""
    return None if cfg.targets == DEFAULT_TARGETS else cfg.targets


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | QuantLoRALinear | ExpertLoRA]:
    """Every adapter in the model by the name of the module it adapts."""
    found: dict[str, LoRALinear | QuantLoRALinear | ExpertLoRA] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear | QuantLoRALinear):
            found[name] = m
        elif isinstance(m, _EXPERTS) and isinstance(m.adapter, ExpertLoRA):
            found[name] = m.adapter
    return found


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight and remove it; returns the names merged. The merged model computes
    what the adapted one did (within rounding) with no extra cost. A quantised model is refused before anything
    changes: its adapters merge into the unquantised base it was made from (``merge_checkpoint``)."""
    adapters = lora_modules(model)
    quantised = [n for n, a in adapters.items() if isinstance(a, QuantLoRALinear)
                 or isinstance(model.get_submodule(n), QuantRoutedExperts)]
    if quantised:
        raise ValueError(f"{quantised[0]} is quantised: an adapter is not merged into int8/int4 codes (that would "
                         "round twice); merge it into the unquantised base checkpoint (deepseek-moe merge BASE "
                         "ADAPTER OUT)")
    merged = []
    for name, adapter in adapters.items():
        module = model.get_submodule(name)
        if isinstance(adapter, ExpertLoRA):
            assert isinstance(module, RoutedExperts)
            adapter.merge_into(module)
            module.adapter = None
        else:
            parent, child = _parent(model, name)
            setattr(parent, child, adapter.unwrap(merge=True))
        merged.append(name)
    return merged


def remove_lora(model: nn.Module) -> list[str]:
    """Drop every adapter unmerged: the base model as it was."""
    removed = []
    for name, adapter in lora_modules(model).items():
        module = model.get_submodule(name)
        if isinstance(adapter, ExpertLoRA):
            assert isinstance(module, _EXPERTS)
            module.adapter = None
        else:
            parent, child = _parent(model, name)
            setattr(parent, child, adapter.unwrap(merge=False))
        removed.append(name)
    return removed


def is_lora_parameter(name: str) -> bool:
    return ".lora_" in f".{name}" or ".adapter." in name


def is_router_parameter(name: str) -> bool:
    return ".ffn.gate." in name


def mark_trainable(model: nn.Module, *, train_router: bool = False) -> list[str]:
    """requires_grad on the adapters only (and the routers' weights with ``train_router``); returns the names
    left trainable. The routing bias is a buffer the training loop updates, not a parameter: the trainer leaves
    it alone unless the router is trained (finetune/)."""
    trainable = []
    for name, p in model.named_parameters():
        keep = is_lora_parameter(name) or (train_router and is_router_parameter(name))
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    return trainable
