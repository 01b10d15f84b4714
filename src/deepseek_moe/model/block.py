"""A transformer block: pre-norm attention and pre-norm FFN, each with a residual connection.

Blocks before ``n_dense_layers`` use a dense SwiGLU FFN of width ``inter_dim`` (DeepSeekMoE §4.1: the first
layers route poorly, so they stay dense); the rest use the MoE layer, which returns only its own output, so
the residual is added here.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepseek_moe.config import ModelConfig
from deepseek_moe.model.kv_cache import LayerCache
from deepseek_moe.model.mha import MHA
from deepseek_moe.model.mla import MLA
from deepseek_moe.model.norm import RMSNorm
from deepseek_moe.moe.dropping import ProtectedDraw
from deepseek_moe.moe.experts import FeedForward
from deepseek_moe.moe.layer import MoE


def build_attention(cfg: ModelConfig) -> MLA | MHA:
    return MLA(cfg) if cfg.attention == "mla" else MHA(cfg)


def build_ffn(cfg: ModelConfig, layer_id: int) -> FeedForward | MoE:
    if layer_id < cfg.n_dense_layers:
        return FeedForward(cfg.dim, cfg.inter_dim)
    return MoE(cfg.moe, layer_id=layer_id)


class Block(nn.Module):
    """``activation_checkpointing`` (``"none"`` by default; ``set_activation_checkpointing`` switches a whole
    model), when training: ``"full"`` keeps only the block's input and recomputes all its activations in the
    backward (torch's non-reentrant checkpoint), about one more forward for the memory of every intermediate;
    ``"attention"`` recomputes only the attention half (its norm, projections and scores) and keeps the FFN's,
    so the MoE layer's expert products, most of a block's FLOPs, run once (LoRA on a quantised V2-Lite:
    docs/finetuning.md)."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = build_ffn(cfg, layer_id)
        self.activation_checkpointing: str = "none"

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: LayerCache | None = None, *, token_mask: torch.Tensor | None = None,
                protected: ProtectedDraw | None = None) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim). ``mask`` is attention's; ``token_mask`` (B, T) marks the real tokens (so
        padding never reaches the router) and ``protected`` is the forward's protected-sequence draw, both for an
        MoE FFN only."""
        mode = self.activation_checkpointing if torch.is_grad_enabled() and cache is None else "none"
        if mode == "full":
            return checkpoint(self._forward, x, cos, sin, mask, None, token_mask=token_mask, protected=protected,
                              use_reentrant=False, context_fn=self._recompute_contexts)
        if mode == "attention":
            x = checkpoint(self._attention, x, cos, sin, mask, None, use_reentrant=False)
            return self._ffn(x, token_mask=token_mask, protected=protected)
        return self._forward(x, cos, sin, mask, cache, token_mask=token_mask, protected=protected)

    def _recompute_contexts(self) -> tuple[contextlib.AbstractContextManager[None],
                                           contextlib.AbstractContextManager[None]]:
        """(forward, recompute) contexts: the recompute replays the MoE layer's forward exactly (its random
        draws from the same generator state) and leaves no trace (counts, statistics) a second time."""
        if not isinstance(self.ffn, MoE):
            return contextlib.nullcontext(), contextlib.nullcontext()
        replay = self.ffn.replay()
        return replay.record(), replay.recompute()

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                 cache: LayerCache | None = None, *, token_mask: torch.Tensor | None = None,
                 protected: ProtectedDraw | None = None) -> torch.Tensor:
        return self._ffn(self._attention(x, cos, sin, mask, cache), token_mask=token_mask, protected=protected)

    def _attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                   cache: LayerCache | None = None) -> torch.Tensor:
        return x + self.attn(self.attn_norm(x), cos, sin, mask, cache)

    def _ffn(self, x: torch.Tensor, *, token_mask: torch.Tensor | None = None,
             protected: ProtectedDraw | None = None) -> torch.Tensor:
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            return x + self.ffn(h, token_mask=token_mask, protected=protected)
        return x + self.ffn(h)


CHECKPOINTING_MODES = ("none", "full", "attention")


def checkpointing_mode(mode: bool | str) -> str:
    """One of :data:`CHECKPOINTING_MODES` (True: ``"full"``, False: ``"none"``, as configs written before the
    modes said it)."""
    if isinstance(mode, bool):
        return "full" if mode else "none"
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"activation_checkpointing ({mode!r}) must be a bool or one of {', '.join(CHECKPOINTING_MODES)}")
    return mode


def set_activation_checkpointing(model: nn.Module, mode: bool | str = True) -> None:
    """Set every Block of ``model`` to activation checkpointing ``mode`` (see :class:`Block`; True: ``"full"``)."""
    mode = checkpointing_mode(mode)
    for module in model.modules():
        if isinstance(module, Block):
            module.activation_checkpointing = mode
