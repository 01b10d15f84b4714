"""The DeepSeekMoE causal language model: embedding, blocks, final norm, output head."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.config import ModelConfig
from deepseek_moe.model.block import Block
from deepseek_moe.model.init import ShardOf, constant, draw_seed, fill, is_meta, normal, whole
from deepseek_moe.model.kv_cache import KVCache
from deepseek_moe.model.mtp import MTPModule, MTPOutput, mtp_loss
from deepseek_moe.model.norm import RMSNorm
from deepseek_moe.model.rope import RotaryEmbedding
from deepseek_moe.moe.all_layers import collect_aux_loss, moe_layers
from deepseek_moe.moe.dropping import ProtectedDraw, ProtectedSequences
from deepseek_moe.moe.layer import MoE, layer_seed
from deepseek_moe.nn.cross_entropy import head_cross_entropy
from deepseek_moe.nn.linear import Linear

if TYPE_CHECKING:
    from deepseek_moe.infer.generate import GenerateOutput

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    """logits (B, T, vocab) float32; losses are 0-dim (None without labels); cache is the one passed in.

    ``hidden`` (B, T, dim): the main model's last hidden state after its final norm (what the head reads; MTP
    depth 1 takes it, see :meth:`DeepSeekMoEForCausalLM.mtp_forward`). ``mtp_loss``: with labels and
    ``mtp_depth`` > 0, (1/D) Σ_k CE_k of the MTP modules, added to ``loss`` with weight ``mtp_lambda``."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    cache: KVCache | None = None
    hidden: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None


def positions_of(key_mask: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) positions of the last T of the slots in the key mask (B, S): each row counts only its real tokens,
    so a left-padded prompt starts at position 0."""
    S = key_mask.shape[1]
    return (key_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, S - T:]


def attention_mask_4d(key_mask: torch.Tensor, T: int) -> torch.Tensor:
    """(B, 1, T, S) bool from the key mask (B, S) of all slots, the last T of which are the new tokens.

    A query sees earlier real tokens and always itself, so a padding query has one finite score instead of a
    fully masked row, whose softmax would be NaN and would leak into later layers through 0 * NaN.
    """
    S = key_mask.shape[1]
    causal = torch.ones(T, S, dtype=torch.bool, device=key_mask.device).tril(S - T)
    slots = torch.arange(S, device=key_mask.device)
    itself = slots[None, :] == slots[S - T:, None]  # (T, S)
    return (causal[None] & (key_mask[:, None, :] | itself[None]))[:, None]


class DeepSeekMoEForCausalLM(nn.Module):
    """Embedding -> n_layers Blocks (the first n_dense_layers dense, the rest MoE) -> RMSNorm -> head.

    Inference state is not kept here: pass a ``KVCache`` (``new_cache()``) to ``forward`` to decode step by
    step. Loading, saving and generation live in the packages above the model (``deepseek_moe.from_pretrained``,
    ``deepseek_moe.save_pretrained``, ``deepseek_moe.generate``); the methods of those names spell the same
    calls the transformers way. ``config`` is the ModelConfig; ``tokenizer`` is optional and set by whoever
    trains or loads the model.
    """

    def __init__(self, cfg: ModelConfig, *, init_seed: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        # The base seed of the per-parameter initialisation (model/init.py); drawn first, before any submodule
        # touches the global generator, so a model built on the meta device gets the same one.
        self.init_seed = draw_seed() if init_seed is None else init_seed
        self.tokenizer: Any = None  # set by the train and io helpers; generation with text needs one
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Multi-token prediction modules (DeepSeek-V3 §2.2), sharing embed and head; none when mtp_depth is 0.
        self.mtp = nn.ModuleList(MTPModule(cfg, k) for k in range(1, cfg.mtp_depth + 1))
        self.rope = RotaryEmbedding(cfg)
        # One protected-sequence draw per forward, shared by every MoE layer (a stream no layer's generator uses).
        self.protected_sequences = ProtectedSequences(layer_seed(cfg.moe.seed, cfg.n_layers))
        self.reset_parameters()
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight

    def reset_parameters(self, shard_of: ShardOf = whole) -> None:
        """normal(0, init_std) for every Linear and Embedding, ones for norms, zero biases; the MoE layers' gates
        and stacked experts normal(0, moe.init_std) (each expert drawn alone). Every parameter from its own
        generator seeded by (init_seed, its name): see :mod:`deepseek_moe.model.init`. ``shard_of`` gives the
        part of each parameter this process holds (a sharded model initialises only its shards). Does nothing
        on the meta device (the sharded build materialises, then calls this)."""
        if is_meta(self):
            return
        std, seed, done = self.config.init_std, self.init_seed, set()

        def init(p: torch.Tensor, name: str, draw: Any, per_expert: bool = False) -> None:
            if id(p) not in done:  # a tied weight is initialised once, by its first owner
                done.add(id(p))
                fill(p, name, seed, draw, per_expert=per_expert, shard_of=shard_of)

        for mname, module in self.named_modules():
            prefix = f"{mname}." if mname else ""
            if isinstance(module, nn.Linear | nn.Embedding):
                init(module.weight, prefix + "weight", normal(std))
                if isinstance(module, nn.Linear) and module.bias is not None:
                    init(module.bias, prefix + "bias", constant(0.0))  # attention_bias: zero, as in transformers
            elif isinstance(module, RMSNorm):
                init(module.weight, prefix + "weight", constant(1.0))
            elif isinstance(module, MoE):
                moe_std = module.cfg.init_std
                init(module.gate.weight, prefix + "gate.weight", normal(moe_std))
                for w in ("w1", "w2", "w3"):
                    init(getattr(module.experts, w), f"{prefix}experts.{w}", normal(moe_std), per_expert=True)
                module.reset_state()
            elif isinstance(module, ProtectedSequences):
                module.reset()

    def forward(self, input_ids: torch.Tensor, *, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                mtp_lambda: float | None = None) -> CausalLMOutput:
        """input_ids (B, T); labels (B, T) unshifted (the model shifts; -100 is ignored); attention_mask (B, T)
        1 for real tokens, 0 for (left) padding; cache, if given, is extended in place with these tokens.
        With labels and MTP modules, they run too and ``loss`` adds ``mtp_lambda`` (default
        ``config.mtp_lambda``; a training schedule passes its own) times ``mtp_loss``.

        Padding never reaches the routers: the MoE layers get the mask of the new tokens (padding is routed
        nowhere and counted in no loss, budget or statistic). When the MoE layers drop tokens, one
        protected-sequence draw is made here and shared by all of them, so a protected sequence is drop-free in
        every layer (DeepSeek-V2 §2.2.4)."""
        B, T = input_ids.shape
        new_mask = (torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None
                    else attention_mask.to(torch.bool))
        key_mask = new_mask if cache is None else cache.extend_mask(new_mask)  # (B, S)
        positions = positions_of(key_mask, T)
        n_positions = int(positions.max()) + 1 if T > 0 else 0
        if n_positions > self.config.max_seq_len:
            raise ValueError(f"sequence of {n_positions} positions exceeds max_seq_len "
                             f"({self.config.max_seq_len}) of this model")
        # A mask of all ones is no mask: attention and the routers take their unmasked paths.
        mask = None if bool(key_mask.all()) else attention_mask_4d(key_mask, T)
        token_mask = None if attention_mask is None or bool(new_mask.all()) else new_mask
        protected = self.protected_sequences.draw() if self._may_drop() else None
        hidden = self.forward_hidden(input_ids, positions, mask, cache, token_mask=token_mask, protected=protected)
        if labels is None:
            logits, ce_loss = self.head(hidden).float(), None
        else:
            logits, ce_loss = self.next_token_loss(hidden, labels)

        out = CausalLMOutput(logits=logits, cache=cache, hidden=hidden)
        if labels is not None:
            if len(self.mtp):  # before the balance losses are collected: the MTP blocks' MoE layers add theirs
                mtp_logits = self.mtp_train_logits(input_ids, hidden, positions, mask, token_mask=token_mask,
                                                   protected=protected)
                out.mtp_loss = mtp_loss(mtp_logits, labels, IGNORE_INDEX)
            assert ce_loss is not None  # computed with the logits above
            out.ce_loss = ce_loss
            out.aux_loss = collect_aux_loss(self).to(logits.device)
            out.loss = ce_loss + out.aux_loss
            if out.mtp_loss is not None:
                weight = self.config.mtp_lambda if mtp_lambda is None else mtp_lambda
                out.loss = out.loss + weight * out.mtp_loss
        return out

    def _may_drop(self) -> bool:
        """Whether a MoE layer drops tokens in this forward. Every layer of ours is built from ``config.moe``, so a
        config that never drops (no capacity factor; or evaluation without ``drop_at_inference``) answers without
        walking the module tree (~100 us a decode step of the mid-size model, for an answer evaluation knew). The
        model's own mode decides: a layer switched to training inside an evaluating model draws its own protected
        sequences."""
        moe_cfg = self.config.moe
        if moe_cfg.capacity_factor is None or not (self.training or moe_cfg.drop_at_inference):
            return False
        return any(moe.drops_tokens for _, moe in moe_layers(self))

    def next_token_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, T, vocab) float32, the mean cross-entropy of each position against the next one's label)
        from ``hidden`` (B, T, dim) and unshifted ``labels`` (B, T) (IGNORE_INDEX ignored). The labels are shifted,
        not the logits: slicing (B, T, vocab) copies it, and the slice's backward zero-fills and copies a gradient
        of that size again (a fifth of the tiny preset's step besides attention). The last position gets no label,
        so the mean runs over the same B * (T - 1) tokens."""
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        logits_NV, ce = head_cross_entropy(self.head, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1),
                                           IGNORE_INDEX)
        return logits_NV.view(*hidden.shape[:-1], -1), ce

    def forward_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                       cache: KVCache | None = None, *, token_mask: torch.Tensor | None = None,
                       protected: ProtectedDraw | None = None) -> torch.Tensor:
        """The forward's body, logits (B, T, vocab) float32, with no branch on tensor values: ``forward`` works
        out positions (B, T) (:func:`positions_of`), the attention ``mask`` (B, 1, T, S) and the routers'
        ``token_mask`` (B, T) from the attention mask and calls it; the ONNX export (export/lm.py) traces it with
        the masks always built, so that one graph serves padded and unpadded batches. ``cache``: anything with
        ``layers[i].append`` (a KVCache, or export's cache of explicit tensors)."""
        return self.head(self.forward_hidden(input_ids, positions, mask, cache, token_mask=token_mask,
                                             protected=protected)).float()

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows, in the dtype the blocks compute in: a frozen table may be stored narrower (a LoRA
        run keeps V2-Lite's 0.8 GB fp32 table in bf16, or in int8 codes with a scale per row, adapters/frozen_base.py)
        and is widened row by row here."""
        h, dtype = self.embed(input_ids), self.norm.weight.dtype
        scale = getattr(self.embed, "weight_scale", None)
        if scale is not None:  # int8 codes: each looked-up row times its own scale
            return h.to(dtype) * scale[input_ids].unsqueeze(-1).to(dtype)
        return h if h.dtype == dtype else h.to(dtype)

    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                       cache: KVCache | None = None, *, token_mask: torch.Tensor | None = None,
                       protected: ProtectedDraw | None = None) -> torch.Tensor:
        """:meth:`forward_logits` up to the head: the last hidden state after the final norm, (B, T, dim)."""
        cos, sin = self.rope(positions)
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, None if cache is None else cache.layers[i], token_mask=token_mask,
                      protected=protected)
        return self.norm(h)

    def mtp_train_logits(self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                         mask: torch.Tensor | None, *, token_mask: torch.Tensor | None = None,
                         protected: ProtectedDraw | None = None) -> list[torch.Tensor]:
        """Every MTP depth over a whole sequence (training; no cache): ``logits[k-1]`` (B, T - k, vocab) float32,
        position i predicting t_{i+k+1}. Depth k runs over the T - k positions whose input token t_{i+k} exists,
        at those tokens' positions, with the main forward's ``mask`` (B, 1, T, T) (or None: causal) cut to them;
        ``token_mask`` (B, T) real tokens; ``protected`` the forward's protected-sequence draw."""
        T = input_ids.shape[1]
        emb = self.embed_tokens(input_ids)
        logits: list[torch.Tensor] = []
        h = hidden
        for k, module in enumerate(self.mtp, start=1):
            n = T - k
            if n <= 0:  # too short a sequence for this depth (and every deeper one): no prediction
                logits.append(hidden.new_zeros(hidden.shape[0], 0, self.config.vocab_size, dtype=torch.float32))
                for _, moe in moe_layers(module):  # it did not run: no balance loss or statistics of an old forward
                    moe.aux_loss, moe.last_stats = hidden.new_zeros((), dtype=torch.float32), None
                continue
            cos, sin = self.rope(positions[:, k:])
            cut = None if mask is None else mask[..., :n, :n]
            real = None if token_mask is None else token_mask[:, :n] & token_mask[:, k:]
            h = module(h[:, :n], emb[:, k:], cos, sin, cut, token_mask=real, protected=protected)
            logits.append(self.head(h).float())
        return logits

    def mtp_forward(self, depth: int, hidden: torch.Tensor, input_ids: torch.Tensor, *,
                    attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                    last_logits_only: bool = False, hidden_only: bool = False) -> MTPOutput:
        """MTP depth ``depth`` (1-based) at inference, position by position as a drafter runs it.

        ``hidden`` (B, T, dim): h^{depth-1} at positions i (depth 1: ``forward(...).hidden`` of the main model;
        depth k > 1: the ``hidden`` this method returned for depth k - 1); ``input_ids`` (B, T): the tokens
        t_{i+depth}, one place after those the hidden states were computed at for depth 1 (the token the main
        model chose next), the previous depth's draft for deeper ones. ``attention_mask`` (B, T): 1 where the
        hidden state is a real token's, 0 for (left) padding (the main forward's mask without its last column). ``cache``: this depth's own KVCache of one layer (:meth:`new_mtp_caches`), extended in place,
        like the main model's (so a drafter rolls it back the same way). Returns h^depth and the logits for
        t_{i+depth+1} (B, T, vocab), or only the last position's (B, 1, vocab) with ``last_logits_only`` (a drafter
        needs no more, and the head is the module's largest matrix), or none, (B, 0, vocab), with ``hidden_only`` (a
        cache being filled with verified positions, as the server's scheduler does). Over a whole sequence without cache it equals :meth:`mtp_train_logits`' depth 1; chaining
        depth k on the outputs of depth k - 1 is V3's sequential prediction."""
        if not 1 <= depth <= len(self.mtp):
            raise ValueError(f"depth ({depth}) must be in 1..mtp_depth ({len(self.mtp)})")
        B, T = input_ids.shape
        if hidden.shape[:2] != (B, T):
            raise ValueError(f"hidden {tuple(hidden.shape)} must be (B, T, dim) for input_ids {(B, T)}")
        new_mask = (torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None
                    else attention_mask.to(torch.bool))
        key_mask = new_mask if cache is None else cache.extend_mask(new_mask)
        # The tokens' positions: the cache's first slot holds t_depth (hidden state 0 with token depth), as in
        # training, where depth k runs at positions k.. of the sequence.
        positions = positions_of(key_mask, T) + depth
        mask = None if bool(key_mask.all()) else attention_mask_4d(key_mask, T)
        token_mask = None if attention_mask is None or bool(new_mask.all()) else new_mask
        cos, sin = self.rope(positions)
        h = self.mtp[depth - 1](hidden, self.embed_tokens(input_ids), cos, sin, mask,
                                None if cache is None else cache.layers[0], token_mask=token_mask)
        return MTPOutput(hidden=h, logits=self.head(h[:, :0] if hidden_only else h[:, -1:] if last_logits_only
                                                    else h).float())

    def new_mtp_caches(self) -> list[KVCache]:
        """One KVCache (of one layer) per MTP depth: each depth runs one position behind the previous one."""
        return [KVCache(1) for _ in self.mtp]

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    # The transformers idiom. These three methods are the one sanctioned upward import in the package: model/
    # sits below io/ and infer/, so each imports its function when called (tests/unit/test_import_layers.py
    # exempts exactly these three and counts every other import, lazy or not).
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> DeepSeekMoEForCausalLM:
        """``deepseek_moe.from_pretrained(path, **kwargs)``: dtype, device, hooks, quantize (io/load.py), and
        adapters (PEFT-format directories applied unmerged, adapters/pretrained.py)."""
        from deepseek_moe.adapters.pretrained import from_pretrained

        return from_pretrained(path, **kwargs)

    def save_pretrained(self, path: str | os.PathLike[str], **kwargs: Any) -> str:
        """``deepseek_moe.save_pretrained(self, path, **kwargs)``: max_shard_size, quantization_config
        (io/save.py); returns the format written."""
        from deepseek_moe.io.save import save_pretrained

        return save_pretrained(self, path, **kwargs)

    def generate(self, input_ids: torch.Tensor | Sequence[Sequence[int]], **kwargs: Any) -> GenerateOutput:
        """``deepseek_moe.generate(self, input_ids, **kwargs)``: max_new_tokens, temperature, top_k, top_p,
        stop_tokens, seed, stream, pad_token_id (infer/generate.py)."""
        from deepseek_moe.infer.generate import generate

        return generate(self, input_ids, **kwargs)
