"""LoRA modules: a Linear with a low-rank pair, and a per-expert low-rank pair for the stacked routed experts.

Shapes (moe/'s legend): A rows, D model dim, F expert hidden, E experts, r rank.

:class:`LoRALinear` *is* the Linear it adapts (same ``weight`` and ``bias`` objects, so the base's checkpoint
names are unchanged) plus ``lora_A`` (r, in) and ``lora_B`` (out, r). :class:`ExpertLoRA` sits in
``RoutedExperts.adapter`` and follows transformers' fused expert layout, which is what PEFT adapts: one pair on
gate_up (A (E, r, D), B (E, 2F, r), gate rows over up rows) and one on down (A (E, r, F), B (E, D, r)). Its
terms are grouped products through the experts' own :meth:`RoutedExperts.product` (MKL's batched GEMM or
``grouped_mm``), never a Python loop over experts, and are tested against a per-token loop
(tests/unit/test_adapters_lora.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.adapters.config import LoRAConfig
from deepseek_moe.adapters.quant_experts import compact_lora_swiglu
from deepseek_moe.moe.experts import FeedForward, GroupedProduct, RoutedExperts
from deepseek_moe.moe.layer import MoE
from deepseek_moe.nn.compute_copy import compute_dtype
from deepseek_moe.nn.linear import Linear
from deepseek_moe.nn.widen import NARROW
from deepseek_moe.quant.modules import QuantLinear, QuantRoutedExperts

# init="random": B small, so that the update is of the size training makes, not larger than the base's signal.
RANDOM_B_GAIN = 0.1


def _uniform_fan_in(t: torch.Tensor, fan_in: int, gain: float = 1.0) -> None:
    """PEFT's (and nn.Linear's) Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), times
    ``gain``."""
    bound = gain / math.sqrt(fan_in)
    with torch.no_grad():
        t.uniform_(-bound, bound)


class _LowRankPair(nn.Module):
    """The pair a LoRA linear adds: ``lora_A`` (r, in), ``lora_B`` (out, r), ``scaling``, ``dropout``."""

    in_features: int
    out_features: int
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def _add_pair(self, cfg: LoRAConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.lora_A = nn.Parameter(torch.empty(cfg.r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.r, dtype=dtype, device=device))
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        _uniform_fan_in(self.lora_A, self.in_features)
        if cfg.init == "random":
            _uniform_fan_in(self.lora_B, cfg.r, RANDOM_B_GAIN)

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """``scaling * B A dropout(x)`` in x's compute dtype."""
        dtype = compute_dtype(x)
        low = F.linear(F.linear(self.dropout(x).to(dtype), self.lora_A.to(dtype)), self.lora_B.to(dtype))
        return low * self.scaling

    def delta_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(out, in) ``scaling * B A`` in ``dtype``."""
        return (self.lora_B.float() @ self.lora_A.float() * self.scaling).to(dtype)


class LoRALinear(_LowRankPair, Linear):
    """``base(x) + scaling * B A dropout(x)``; :meth:`unwrap` (merge=True) folds ``scaling * B A`` into the
    weight."""

    def __init__(self, base: Linear, cfg: LoRAConfig, *, dtype: torch.dtype = torch.float32) -> None:
        nn.Module.__init__(self)  # not Linear's: the weight and bias are the base's own, not new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self._add_pair(cfg, dtype, base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Linear.forward(self, x) + self.low_rank(x)

    def matrix(self) -> torch.Tensor:
        """The weight with the update added (differentiable): what MLA's absorbed attention folds in. A frozen
        base narrower than the adapters (adapters/frozen_base.py) is widened to their dtype, as its products are."""
        delta = self.lora_B @ self.lora_A * self.scaling
        if self.weight.dtype in NARROW and not self.weight.requires_grad and delta.dtype == torch.float32:
            return self.weight.to(delta.dtype) + delta
        return self.weight + delta.to(self.weight.dtype)

    def unwrap(self, *, merge: bool) -> Linear:
        """The plain Linear holding this module's weight (with the update folded in when ``merge``)."""
        if merge:
            with torch.no_grad():
                self.weight += self.delta_weight(self.weight.dtype)
        plain = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain


class QuantLoRALinear(_LowRankPair, QuantLinear):
    """LoRA on a frozen quantised linear (QLoRA's arrangement, in our int8/int4 format): the base's codes,
    scales and bias (the same tensors, so its names are unchanged) plus a pair in float. The base passes the
    gradient to x without dequantising its whole matrix (quant/grad.py). An update cannot be folded into codes
    without a second rounding, so :meth:`unwrap` refuses ``merge``: merge the adapter into BASE's unquantised
    weights instead (``deepseek-moe merge``)."""

    def __init__(self, base: QuantLinear, cfg: LoRAConfig, *, dtype: torch.dtype = torch.float32) -> None:
        nn.Module.__init__(self)  # not QuantLinear's: the codes and scales are the base's own
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bits, self.group_size, self.dtype = base.bits, base.group_size, base.dtype
        self.register_buffer("qweight", base.qweight)
        self.register_buffer("weight_scale", base.weight_scale)
        self.bias = base.bias
        self._add_pair(cfg, dtype, base.qweight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QuantLinear.forward(self, x) + self.low_rank(x)

    def matrix(self) -> torch.Tensor:
        return self.weight + self.delta_weight(self.weight.dtype)

    def unwrap(self, *, merge: bool) -> QuantLinear:
        if merge:
            raise ValueError("a LoRA adapter on a quantised layer is not merged into its codes (that would round "
                             "twice): merge it into the unquantised base checkpoint (deepseek-moe merge BASE ADAPTER "
                             "OUT)")
        plain = QuantLinear.__new__(QuantLinear)
        nn.Module.__init__(plain)
        plain.in_features, plain.out_features = self.in_features, self.out_features
        plain.bits, plain.group_size, plain.dtype = self.bits, self.group_size, self.dtype
        plain.register_buffer("qweight", self.qweight)
        plain.register_buffer("weight_scale", self.weight_scale)
        plain.bias = self.bias
        return plain


def expert_dims(experts: RoutedExperts | QuantRoutedExperts) -> tuple[int, int, int]:
    """(E, F, D) of stacked routed experts, float or quantised (int4 codes hold two columns a byte)."""
    if isinstance(experts, QuantRoutedExperts):
        return experts.n_experts, experts.inter_dim, experts.dim
    E, F_, D = experts.w1.shape
    return E, F_, D


class ExpertLoRA(nn.Module):
    """Per-expert LoRA for :class:`RoutedExperts` (set as its ``adapter``): gate_up and down pairs, see above."""

    def __init__(self, experts: RoutedExperts | QuantRoutedExperts, cfg: LoRAConfig, *,
                 down: LoRAConfig | None = None, dtype: torch.dtype = torch.float32) -> None:
        """``down``: the down pair's rank and scale where they differ from gate_up's (an adapter PEFT wrote with a
        rank_pattern); else ``cfg``'s."""
        super().__init__()
        down = down or cfg
        E, F_, D = expert_dims(experts)
        device = experts.w1.device
        self.gate_up_A = nn.Parameter(torch.empty(E, cfg.r, D, dtype=dtype, device=device))
        self.gate_up_B = nn.Parameter(torch.zeros(E, 2 * F_, cfg.r, dtype=dtype, device=device))
        self.down_A = nn.Parameter(torch.empty(E, down.r, F_, dtype=dtype, device=device))
        self.down_B = nn.Parameter(torch.zeros(E, D, down.r, dtype=dtype, device=device))
        self.scaling, self.down_scaling = cfg.scaling, down.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.compact = True  # False: autograd through the plain SwiGLU (the reference) on quantised experts
        # What the compact path keeps the gate/up pre-activations in for the backward (None: the compute dtype;
        # torch.bfloat16 halves that memory, gradients at bf16 rounding): set_saved_activations sets it.
        self.saved_dtype: torch.dtype | None = None
        _uniform_fan_in(self.gate_up_A, D)
        _uniform_fan_in(self.down_A, F_)
        if cfg.init == "random":
            _uniform_fan_in(self.gate_up_B, cfg.r, RANDOM_B_GAIN)
            _uniform_fan_in(self.down_B, down.r, RANDOM_B_GAIN)

    def gate_up(self, x_AD: torch.Tensor, counts_E: torch.Tensor,
                product: GroupedProduct) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up projections' low-rank terms, each (A, F)."""
        dtype = x_AD.dtype
        t_Ar = product(self.dropout(x_AD), self.gate_up_A.to(dtype), counts_E)
        d_A2F = product(t_Ar, self.gate_up_B.to(dtype), counts_E) * self.scaling
        g_AF, u_AF = d_A2F.chunk(2, dim=1)
        return g_AF, u_AF

    def down(self, h_AF: torch.Tensor, counts_E: torch.Tensor, product: GroupedProduct) -> torch.Tensor:
        """The down projection's low-rank term (A, D)."""
        dtype = h_AF.dtype
        t_Ar = product(self.dropout(h_AF), self.down_A.to(dtype), counts_E)
        return product(t_Ar, self.down_B.to(dtype), counts_E) * self.down_scaling

    def quantised_swiglu(self, experts: QuantRoutedExperts, x: torch.Tensor, counts_E: torch.Tensor,
                         gates_A: torch.Tensor | None, *, rows_A: torch.Tensor | None = None) -> torch.Tensor | None:
        """The quantised experts' whole SwiGLU with this adapter (x and ``rows_A`` as in RoutedExperts.forward),
        keeping only x, the pre-activations and the gates for the backward (adapters/quant_experts.py); None where the plain path must run: ``compact`` off
        (the reference) or dropout drawing masks."""
        if not self.compact or (self.training and not isinstance(self.dropout, nn.Identity)):
            return None
        return compact_lora_swiglu(experts, x, counts_E, gates_A, (self.gate_up_A, self.gate_up_B),
                                   (self.down_A, self.down_B), self.scaling, self.down_scaling, rows_A=rows_A,
                                   saved_dtype=self.saved_dtype)

    def merge_into(self, experts: RoutedExperts | QuantRoutedExperts) -> None:
        """Fold every expert's ``scaling * B A`` into w1, w3 (gate_up's halves) and w2."""
        if isinstance(experts, QuantRoutedExperts):
            raise ValueError("a LoRA adapter on quantised experts is not merged into their codes (that would round "
                             "twice): merge it into the unquantised base checkpoint (deepseek-moe merge BASE "
                             "ADAPTER OUT)")
        gu = torch.bmm(self.gate_up_B.float(), self.gate_up_A.float()) * self.scaling  # (E, 2F, D)
        dw1, dw3 = gu.chunk(2, dim=1)
        dw2 = torch.bmm(self.down_B.float(), self.down_A.float()) * self.down_scaling  # (E, D, F)
        with torch.no_grad():
            for w, d in ((experts.w1, dw1), (experts.w3, dw3), (experts.w2, dw2)):
                w.add_(d.to(w.dtype))


SAVED_ACTIVATIONS = {"float32": None, "bfloat16": torch.bfloat16}


def set_saved_activations(model: nn.Module, dtype: str) -> None:
    """What every per-expert LoRA on quantised experts, and every MoE layer's shared experts, keep their gate/up
    pre-activations in for the backward: ``"float32"`` (the compute dtype) or ``"bfloat16"`` (half the memory;
    the gradients at bf16 rounding, the forward unchanged)."""
    if dtype not in SAVED_ACTIVATIONS:
        raise ValueError(f"expert_activations ({dtype!r}) must be one of {', '.join(SAVED_ACTIVATIONS)}")
    for module in model.modules():
        if isinstance(module, ExpertLoRA):
            module.saved_dtype = SAVED_ACTIVATIONS[dtype]
        elif isinstance(module, MoE) and isinstance(module.shared_experts, FeedForward):
            module.shared_experts.saved_dtype = SAVED_ACTIVATIONS[dtype]
