"""Multi-token prediction (DeepSeek-V3 §2.2): D sequential modules after the main model, module k predicting the
token k + 1 places ahead with the main model's embedding and output head.

Module k (1-based) at position i takes the previous depth's hidden state h_i^{k-1} (h^0: the main model's) and the
embedding of token t_{i+k}:

    h'_i^k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})]        eq. 21  (M_k: eh_proj, d x 2d; enorm, hnorm)
    h_i^k  = RMSNorm_k(TRM_k(h'_i^k))                               eq. 22  (RMSNorm_k: V3's shared_head.norm)
    P_{i+k+1}^k = OutHead(h_i^k)                                    eq. 23  (the main model's head, shared)

The concatenation puts the embedding first, as DeepSeek-V3's released weights are read by vLLM and transformers.
The hidden state a depth hands on is the normed one its head reads (for h^0 the main model's final norm output,
for h^k the module's own norm output). For depth 1, the only one V3 ships, this is what vLLM and transformers do;
for depths >= 2 vLLM hands on the block output before shared_head.norm (eq. 22 read literally), so a checkpoint
trained elsewhere with D >= 2 would be fed differently here (ours train and draft consistently with each other). TRM_k is a Block
of its own, MoE (V3's MTP layer is an MoE layer), with its own cache at inference.

Training runs module k over the T - k positions whose input token t_{i+k} exists (the sequence is truncated,
not padded, so its MoE sees only real tokens); :func:`mtp_loss` is eq. 25's λ/D Σ_k CE_k without the λ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.config import ModelConfig
from deepseek_moe.model.block import Block
from deepseek_moe.model.kv_cache import LayerCache
from deepseek_moe.model.norm import RMSNorm
from deepseek_moe.moe.dropping import ProtectedDraw
from deepseek_moe.nn.cross_entropy import cross_entropy
from deepseek_moe.nn.linear import Linear


@dataclass
class MTPOutput:
    """One MTP depth over some positions: ``hidden`` (B, T, dim), the h^k the next depth takes, and ``logits``
    (B, T, vocab) float32 for the token k + 1 places after each position's own."""

    hidden: torch.Tensor
    logits: torch.Tensor


class MTPModule(nn.Module):
    """MTP module ``depth`` (1-based). Its block's layer_id is ``n_layers + depth``: n_layers is the model's
    protected-sequence stream (model/causal_lm.py), so every MoE generator stays distinct. In a V3 checkpoint
    the module is layer ``n_layers + depth - 1`` (io/hf.py maps the names)."""

    def __init__(self, cfg: ModelConfig, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, cfg.n_layers + depth)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, hidden: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: LayerCache | None = None, *, token_mask: torch.Tensor | None = None,
                protected: ProtectedDraw | None = None) -> torch.Tensor:
        """hidden h^{k-1} (B, T, dim) at positions i, emb (B, T, dim) the embeddings of t_{i+k} -> h^k (B, T, dim),
        normed (the head's input). cos/sin are those of the tokens' positions (i + k); ``mask``, ``cache``,
        ``token_mask`` and ``protected`` as for a Block."""
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(hidden)), dim=-1))
        return self.norm(self.block(x, cos, sin, mask, cache, token_mask=token_mask, protected=protected))


def mtp_targets(labels: torch.Tensor, depth: int, ignore_index: int, docs: torch.Tensor | None = None
                ) -> torch.Tensor:
    """(B, T - depth) targets of MTP depth k over the truncated sequence: position i predicts t_{i+k+1}; the last
    position has none (an empty (B, 0) when T <= depth). ``docs`` (B, T): for packed rows, the example each token
    belongs to; a target in another example than position i's is ignored."""
    n = max(labels.shape[1] - depth, 0)
    targets = F.pad(labels[:, depth + 1:], (0, 1), value=ignore_index)[:, :n]
    if docs is not None and n > 1:
        other = F.pad(docs[:, depth + 1:] != docs[:, :n - 1], (0, 1), value=True)
        targets = targets.masked_fill(other, ignore_index)
    return targets


def mtp_loss(logits: list[torch.Tensor], labels: torch.Tensor, ignore_index: int, docs: torch.Tensor | None = None
             ) -> torch.Tensor:
    """(1/D) Σ_k CE_k, CE_k the mean cross-entropy of depth k over its predictions (``logits[k-1]`` (B, T - k,
    vocab)); a depth with no prediction (a sequence too short, or every target ignored) adds 0, not NaN."""
    losses = []
    for k, lg in enumerate(logits, start=1):
        targets = mtp_targets(labels, k, ignore_index, docs).reshape(-1)
        total = cross_entropy(lg.reshape(-1, lg.shape[-1]), targets, ignore_index, "sum")
        losses.append(total / (targets != ignore_index).sum().clamp(min=1))
    return torch.stack(losses).mean()


__all__ = ["MTPModule", "MTPOutput", "mtp_loss", "mtp_targets"]
