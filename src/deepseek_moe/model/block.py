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
from deepseek_moe.kernels.block_one_token import BlockCall, BlockStep, FFNOperands
from deepseek_moe.kernels.moe_one_token import MAX_TOKENS as BLOCK_CALL_TOKENS
from deepseek_moe.kernels.switch import fast_paths_enabled
from deepseek_moe.model.call_plan import PLANS, BlockPlan, global_hooks
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
        if cache is not None and token_mask is None:
            y = self._one_call(x, cos, sin, mask, cache, protected)
            if y is not None:
                return y
        return self._ffn(self._attention(x, cos, sin, mask, cache), token_mask=token_mask, protected=protected)

    def _one_call(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                  cache: LayerCache, protected: ProtectedDraw | None) -> torch.Tensor | None:
        """The block as one C++ call (kernels/block_one_token.py) for a few unpadded new tokens, where its
        attention is an MLA layer taking its own one call, its FFN a MoE layer taking the experts' one call or a
        dense FFN of plain quantised products, its norms plain RMSNorms and nothing hooks them; None otherwise
        (nothing done). The call's arguments are built once and kept while the block is as it was
        (model/call_plan.py BlockPlan).
        A tie at the router's cut leaves the MoE layer to its own forward."""
        # Tracing (an export) is asked first: a shape test before it would become a guard of the traced graph.
        if not fast_paths_enabled() or type(cache) is not LayerCache or cache.dtype not in (None, torch.float32):
            return None
        B, T, _ = x.shape
        if B * T > BLOCK_CALL_TOKENS:
            return None
        plan = PLANS.get(self)
        if plan is None or not plan.holds(self):
            plan = self._plan(cache, x)
            if plan is None:
                PLANS.pop(self, None)
                return None
            PLANS[self] = plan
        call = plan.call

        def write(slots: tuple[torch.Tensor, ...], cached: tuple[torch.Tensor, ...]) -> BlockStep | None:
            kv, k_pe = cached  # the call writes the new slots itself
            return call(x, cos, sin, kv, k_pe, mask)

        step = plan.attn.in_new_slots(cache, T, x, write)
        if step is None:
            return None
        if step.tied:  # the attention half is done (its cache written); the router decides the tie
            return step.y + self.ffn(self.ffn_norm(step.y), protected=protected)
        if step.tokens_per_expert is not None:
            assert isinstance(self.ffn, MoE)
            self.ffn.record_one_call(step.tokens_per_expert, step.n_assignments)
        return step.y

    def _plan(self, cache: LayerCache, x: torch.Tensor) -> BlockPlan | None:
        """The call's arguments, through every check of the layers' own calls; None where the block does not take
        the call now."""
        attn = self.attn
        # Quantised projections first: a float model asks this once a block and step, and goes no further.
        if (not isinstance(attn, MLA) or getattr(attn._modules.get("wkv_a"), "plain_codes", None) is None
                or not attn._one_call_applies(cache, x)):
            return None
        if (any(type(n) is not RMSNorm for n in (self.attn_norm, self.ffn_norm))
                or any(m._forward_hooks or m._forward_pre_hooks for m in (self.attn_norm, self.ffn_norm, attn))
                or global_hooks() or any("forward" in m.__dict__ for m in self.modules())):
            return None
        mla = attn.one_call_operands()
        if isinstance(self.ffn, MoE):
            ffn = self.ffn.one_call_operands()
        else:
            codes = self.ffn.quantised_codes() if type(self.ffn) is FeedForward else None
            ffn = None if codes is None else FFNOperands(router_weight=None, bias_E=None, rule=None, experts=None,
                                                         group_size=0, shared=codes[0], shared_group_size=codes[1])
        if mla is None or ffn is None:
            return None
        call = BlockCall.build(x.shape[-1], (self.attn_norm.weight, self.attn_norm.eps), mla,
                               (self.ffn_norm.weight, self.ffn_norm.eps), ffn)
        return None if call is None else BlockPlan(self, call)

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
