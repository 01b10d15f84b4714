"""LoRAConfig: which modules get a low-rank pair, its rank, scale and dropout (frozen, validated)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# The groups a target may name instead of modules (adapters/targets.py says what each covers).
GROUPS: tuple[str, ...] = ("attention", "shared_experts", "routed_experts", "dense_ffn", "head")
DEFAULT_TARGETS: tuple[str, ...] = ("attention", "shared_experts", "routed_experts", "dense_ffn")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """LoRA (Hu et al. 2021): W x + scaling * B A dropout(x), A (r, in), B (out, r), B zero so training starts
    from the base model. ``scaling`` is alpha / r, or alpha / sqrt(r) with ``use_rslora`` (Kalajdzievski 2023:
    keeps the update's scale stable as r grows).

    ``targets``: group names (:data:`GROUPS`) and/or module names, our names, matched as PEFT matches
    ``target_modules``: a module whose name equals the target or ends in ``.`` + target (``wq_a`` matches every
    layer's; ``layers.3.attn.wo`` one module). ``init``: ``"zero"`` draws A (Kaiming-uniform, PEFT's default)
    and zeroes B; ``"random"`` draws both (tests, and checking a merge changes something).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    targets: tuple[str, ...] = DEFAULT_TARGETS
    init: Literal["zero", "random"] = "zero"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r ({self.r}) must be >= 1")
        if not self.alpha > 0:
            raise ValueError(f"alpha ({self.alpha}) must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout ({self.dropout}) must be in [0, 1)")
        if isinstance(self.targets, str):
            raise ValueError(f"targets must be a tuple of names, got the string {self.targets!r}")
        if not self.targets or any(not t or not isinstance(t, str) for t in self.targets):
            raise ValueError(f"targets ({self.targets!r}) must be one or more non-empty names")
        if self.init not in ("zero", "random"):
            raise ValueError(f"init ({self.init!r}) must be 'zero' or 'random'")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r
