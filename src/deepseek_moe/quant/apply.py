"""Swap a model's float linears and routed experts for their quantised twins.

The model itself never learns it is quantised: the twins keep the forward signatures, and the chosen
:class:`QuantConfig` is recorded as the attribute ``quantization_config`` on the model (None or absent: full
precision; the name transformers and config.json use), which saving and loading read.
"""

from __future__ import annotations

import torch
from torch import nn

from deepseek_moe.moe.experts import RoutedExperts
from deepseek_moe.quant.config import QuantConfig, part_of
from deepseek_moe.quant.modules import QuantLinear, QuantRoutedExperts


def quant_config_of(model: nn.Module) -> QuantConfig | None:
    cfg = getattr(model, "quantization_config", None)
    return cfg if isinstance(cfg, QuantConfig) else None


def _targets(model: nn.Module, qcfg: QuantConfig) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every Linear / RoutedExperts the config quantises."""
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | RoutedExperts):
            continue
        part = part_of(name + ".")
        if part is None or part in qcfg.keep or (part == "head" and tied):
            continue  # embedding, router, kept parts; a tied head is the (unquantised) embedding
        out.append((name, module))
    return out


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def _check_not_quantised(model: nn.Module, qcfg: QuantConfig) -> bool:
    """True when the model already holds exactly this quantisation (a no-op); raises for other bits."""
    current = quant_config_of(model)
    if current is None:
        return False
    if current.bits != qcfg.bits or current.group_size != qcfg.group_size:
        raise ValueError(f"the model is already quantised to int{current.bits} (group {current.group_size}); "
                         f"re-quantising to int{qcfg.bits} (group {qcfg.group_size}) would compound the rounding "
                         "error: quantise the full-precision checkpoint instead")
    return True


@torch.no_grad()
def quantize_model(model: nn.Module, qcfg: QuantConfig) -> nn.Module:
    """Quantise ``model`` in place (each weight replaced as soon as it is quantised) and return it."""
    if _check_not_quantised(model, qcfg):
        return model
    for name, module in _targets(model, qcfg):
        if isinstance(module, RoutedExperts):
            new: nn.Module = QuantRoutedExperts.from_experts(module, bits=qcfg.bits, group_size=qcfg.group_size)
        else:
            assert isinstance(module, nn.Linear)
            new = QuantLinear.from_linear(module, bits=qcfg.bits, group_size=qcfg.group_size)
        _swap(model, name, new)
    setattr(model, "quantization_config", qcfg)  # noqa: B010 (the model class does not declare it, on purpose)
    return model


def prepare_model(model: nn.Module, qcfg: QuantConfig, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace the targets by *empty* quantised twins on the targets' device (meta, for a streaming load)."""
    if _check_not_quantised(model, qcfg):
        return model
    for name, module in _targets(model, qcfg):
        if isinstance(module, RoutedExperts):
            E, F_, D = module.w1.shape
            new: nn.Module = QuantRoutedExperts(E, D, F_, bits=qcfg.bits, group_size=qcfg.group_size,
                                                offset=module.offset, dtype=dtype, device=module.w1.device)
        else:
            assert isinstance(module, nn.Linear)
            new = QuantLinear(module.in_features, module.out_features, bits=qcfg.bits, group_size=qcfg.group_size,
                              bias=module.bias is not None, dtype=dtype, device=module.weight.device)
        _swap(model, name, new)
    setattr(model, "quantization_config", qcfg)  # noqa: B010 (the model class does not declare it, on purpose)
    return model
