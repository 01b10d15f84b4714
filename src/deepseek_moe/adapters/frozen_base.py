"""A LoRA base held in bf16: the frozen matrices narrowed, everything else left in fp32.

LoRA reads its base and never writes it, so the base's matrices can be stored in bf16 (half of fp32's memory)
while activations, adapters, norms, embeddings and the routers stay fp32: the products widen each weight for the
call (nn/widen.py), which on a CPU without native bf16 runs at MKL's fp32 speed instead of torch's generic bf16
loop. Where bf16 is native the whole model can be cast instead (``model.to(torch.bfloat16)``).
"""

from __future__ import annotations

import torch
from torch import nn

from deepseek_moe.moe.experts import RoutedExperts
from deepseek_moe.nn.linear import Linear
from deepseek_moe.nn.widen import NARROW
from deepseek_moe.quant import pack


def narrow_frozen_matrices(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store every frozen matrix weight of ``model`` (Linear weights and biases, the routed experts' stacks) in
    ``dtype``; the number of tensors narrowed. Call after :func:`mark_trainable`: a weight that still wants a
    gradient is an error (the optimizer would step a bf16 master)."""
    if dtype not in NARROW:
        raise ValueError(f"dtype ({dtype}) must be one of {NARROW}: the frozen base is stored narrower than fp32")
    narrowed = 0
    for name, module in model.named_modules():
        names = ("weight", "bias") if isinstance(module, Linear) else (
            RoutedExperts.compute_copy_weights if isinstance(module, RoutedExperts) else ())
        for attr in names:
            p = getattr(module, attr, None)
            if not isinstance(p, nn.Parameter) or p.dtype == dtype:
                continue
            if p.requires_grad:
                raise ValueError(f"{name}.{attr} wants a gradient: only a frozen base is stored in {dtype} "
                                 "(call mark_trainable first)")
            p.data = p.data.to(dtype)
            narrowed += 1
    return narrowed


_ROWS_PER_BLOCK = 4096  # rows of the table quantised at a time


def narrow_frozen_embedding(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Store ``model.embed``'s table in ``dtype`` when it is frozen and not the head's weight too (a lookup
    widens its rows: ``DeepSeekMoEForCausalLM.embed_tokens``); True when it was narrowed. Released checkpoints
    hold it in bf16 already, so nothing is rounded there; V2-Lite's fp32 copy is 0.84 GB, 0.42 GB in bf16.
    ``torch.int8``: codes per row with one fp32 scale each (``pack.quantize_int8``, the format of an int8 base's
    matrices; the scale is the ``weight_scale`` buffer beside the codes): 0.21 GB at V2-Lite's vocabulary."""
    if dtype not in (*NARROW, torch.int8):
        raise ValueError(f"dtype ({dtype}) must be one of {(*NARROW, torch.int8)}: the frozen base is stored "
                         "narrower than fp32")
    embed = getattr(model, "embed", None)
    head = getattr(model, "head", None)
    weight = getattr(embed, "weight", None)
    # The head's own parameter, not ``head.weight``: on a quantised head that property dequantises the whole
    # matrix (1.7 GB transient at V2-Lite's vocabulary) just to be compared.
    head_weight = head._parameters.get("weight") if isinstance(head, nn.Module) else None
    if (not isinstance(embed, nn.Module) or not isinstance(weight, nn.Parameter) or weight.requires_grad
            or weight.dtype == dtype or weight is head_weight or hasattr(embed, "weight_scale")):
        return False
    if dtype == torch.int8:  # by blocks of rows: whole-table temporaries would be 4x the fp32 table at once
        table = weight.detach()
        codes = torch.empty(table.shape, dtype=torch.int8, device=table.device)
        scale = torch.empty(table.shape[0], dtype=pack.INT8_SCALE_DTYPE, device=table.device)
        for first in range(0, table.shape[0], _ROWS_PER_BLOCK):
            block = slice(first, first + _ROWS_PER_BLOCK)
            codes[block], scale[block] = pack.quantize_int8(table[block])
        weight.data = codes
        embed.register_buffer("weight_scale", scale)
    else:
        weight.data = weight.data.to(dtype)
    return True


__all__ = ["narrow_frozen_embedding", "narrow_frozen_matrices"]
