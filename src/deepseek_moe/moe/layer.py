"""The DeepSeekMoE layer: shared experts every token passes through, plus fine-grained routed experts.

    MoE(u) = Σ_{i ≤ K_s} FFN_i(u) + Σ_{i} g_{i,t} FFN_i(u)

The residual (h = u + MoE(u)) is added by the transformer block, not here, so the layer drops into any network.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from deepseek_moe.config import MoEConfig
from deepseek_moe.kernels.block_one_token import FFNOperands
from deepseek_moe.kernels.moe_one_token import MAX_TOKENS as ONE_CALL_TOKENS
from deepseek_moe.kernels.switch import fast_paths_enabled
from deepseek_moe.moe import balance
from deepseek_moe.moe.dispatch import Dispatcher, DropPlan, LocalDispatcher
from deepseek_moe.moe.dropping import ProtectedDraw
from deepseek_moe.moe.experts import FeedForward, RoutedExperts, compute_dtype
from deepseek_moe.moe.router import Router, Routing
from deepseek_moe.moe.stats import MoEStats

_LAYER_SEED_STRIDE = 1_000_003  # decorrelates the random draws of layers that share a config


def layer_seed(seed: int, layer_id: int) -> int:
    """The seed of layer ``layer_id``'s generator (a model's own draws use an id no layer has)."""
    return seed + _LAYER_SEED_STRIDE * layer_id


class MoE(nn.Module):
    """A DeepSeekMoE layer that knows only its config.

    ``forward(x, token_mask=None, protected=None)`` takes x (B, S, dim) or (S, dim) (one sequence) and returns a
    tensor of the same shape. ``token_mask`` (B, S) or (S,), True for real tokens: padding is routed nowhere
    (its output is zero) and counted nowhere (balance losses, drop budget, bias counts, statistics).
    ``protected``: the forward's :class:`ProtectedDraw`, shared by all MoE layers of a model; without it the
    layer draws its own. After each forward, ``aux_loss`` holds the balance losses (0-dim, in the graph; zero
    when none is on or not training) and ``last_stats`` a :class:`MoEStats`. ``uniform_routing`` switches the
    uniform warm-up at run time. ``dispatcher`` is swappable (expert parallelism replaces it with an all-to-all
    one).
    """

    def __init__(self, cfg: MoEConfig, *, layer_id: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, init_std=cfg.init_std)
        self.shared_experts = (FeedForward(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim)
                               if cfg.n_shared_experts > 0 else None)
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.uniform_routing = cfg.uniform_routing
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_stats: MoEStats | None = None
        self._zeros: tuple[torch.Tensor, torch.Tensor] | None = None  # _inference_zeros
        # Selection counts since the last routing-bias update (all micro-batches of one optimizer step).
        self.bias_counts: torch.Tensor
        self.register_buffer("bias_counts", torch.zeros(cfg.n_routed_experts), persistent=False)
        # Adaptive capacity (moe/capacity.py): the factor dropped against now (a Python float, so no dtype cast of
        # the model rounds it), and the per-group loads since the last update; training state saved by
        # routing_state, not in the state_dict.
        self.capacity_now = float(cfg.capacity_factor or 0.0)
        self.capacity_counts: torch.Tensor
        self.register_buffer("capacity_counts", torch.zeros(cfg.n_expert_groups, dtype=torch.float64),
                             persistent=False)
        # Multiplies entropy_loss_alpha: the training loop's schedule (strongest early) sets it each step.
        self.entropy_scale = 1.0
        self._generator: torch.Generator | None = None
        self.recomputing = False  # an activation-checkpointing recompute: count nothing a second time

    def reset_parameters(self) -> None:
        """Re-initialise in place (after ``to_empty`` from the meta device, say); the FFNs' Linears are
        initialised by whoever owns the init scheme (the model's reset_parameters, or nn.Linear's own)."""
        self.gate.reset_parameters()
        self.experts.reset_parameters()
        self.reset_state()

    def reset_state(self) -> None:
        """Zero the routing bias and the pending counts; forget the generator (its seed is the config's)."""
        if self.gate.e_score_correction_bias is not None:
            self.gate.e_score_correction_bias.zero_()
        self.bias_counts.zero_()
        self.capacity_now = float(self.cfg.capacity_factor or 0.0)
        self.capacity_counts.zero_()
        self._generator = None

    @property
    def seed(self) -> int:
        return layer_seed(self.cfg.seed, self.layer_id)

    @property
    def capacity_factor(self) -> float | None:
        """The factor the drop budget uses now: the config's, or the adaptive one the training loop moves."""
        if self.cfg.capacity_factor is None:
            return None
        return self.capacity_now if self.cfg.capacity_policy == "adaptive" else self.cfg.capacity_factor

    @property
    def drops_tokens(self) -> bool:
        """Whether a forward now drops over-budget assignments (training, or ``drop_at_inference``)."""
        return self.cfg.capacity_factor is not None and (self.training or self.cfg.drop_at_inference)

    def generator(self, device: torch.device) -> torch.Generator:
        """The seeded generator of uniform routing and of the layer's own protected-sequence draws."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def forward(self, x: torch.Tensor, *, token_mask: torch.Tensor | None = None,
                protected: ProtectedDraw | None = None) -> torch.Tensor:
        cfg = self.cfg
        if x.dim() not in (2, 3) or x.shape[-1] != cfg.dim:
            raise ValueError(f"MoE input must have shape (B, S, {cfg.dim}) or (S, {cfg.dim}), got {tuple(x.shape)}")
        x_BSD = x if x.dim() == 3 else x.unsqueeze(0)
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        real_T = self._real_tokens(token_mask, B, S)
        x_rD = x_TD if real_T is None else x_TD[real_T]  # r: the real tokens, in batch order
        n_real = x_rD.shape[0]
        dropping = self.drops_tokens
        # Where this batch sits in the batch that batch-wide draws cover (a collective under expert parallelism,
        # so asked once, and only when a draw needs it).
        span = self.dispatcher.batch_span(B, n_real) if self.uniform_routing or dropping else None

        call = None if self.training else self._one_token_call()
        if call is not None and B * S <= ONE_CALL_TOKENS and real_T is None and span is None:
            # A decode step or a verification: the whole layer in one kernel call where the experts offer one
            # (QuantRoutedExperts.layer_one_token: selection, experts, shared experts and sum in C++).
            layer = call(x_TD, self.gate, self.shared_experts)
            if layer is not None:
                no_loss, no_drops = self._inference_zeros(x)
                self.aux_loss = no_loss
                self.last_stats = MoEStats(layer.tokens_per_expert, no_drops, layer.indices_K.numel())
                return layer.y_1D.view(x.shape)

        if span is not None and self.uniform_routing:
            # Drawn over the whole batch and sliced, as for the protected sequences: under expert parallelism
            # the ranks' tokens get the draws one process would give them, not all the same ones.
            routing = self.gate.uniform(span.n_tokens, self.generator(x.device), x.device)
            mine = slice(span.first_token, span.first_token + n_real)
            routing = Routing(routing.indices_TK[mine], routing.weights_TK[mine], None)
        else:
            routing = self.gate(x_rD)

        drop = None
        if span is not None and dropping:
            capacity = self.capacity_factor
            assert capacity is not None  # implied by dropping; narrows the type
            # Protected sequences are drawn over the whole batch (all ranks' sequences under expert parallelism)
            # from the model's draw for this forward, so every layer and rank agrees with one process.
            draw = protected if protected is not None else ProtectedDraw.next(self.generator(x.device))
            protected_B = draw.sequences(span.n_sequences, cfg.protected_fraction).to(x.device)
            protected_T = protected_B[span.first_sequence:span.first_sequence + B].repeat_interleave(S)
            drop = DropPlan(capacity, cfg.n_expert_groups,
                            protected_T if real_T is None else protected_T[real_T], n_tokens=span.n_tokens)
        # The experts' operands in the compute dtype (bf16 under autocast) once, before the gather copies each
        # row K times and the shared experts read it: the router above has already read x in fp32.
        x_rD = x_rD.to(compute_dtype(x_rD))
        dispatched = self.dispatcher(x_rD, routing, self.experts, drop)
        y_rD = dispatched.y_TD
        if self.shared_experts is not None:
            y_rD = y_rD + self.shared_experts(x_rD)
        y_TD = y_rD if real_T is None else y_rD.new_zeros(B * S, D).index_copy(0, real_T.nonzero().flatten(), y_rD)

        tokens_per_expert = torch.bincount(routing.indices_TK.reshape(-1), minlength=cfg.n_routed_experts)
        if (self.training and cfg.use_routing_bias and not self.uniform_routing  # warm-up routes are not the router's
                and not self.recomputing):
            self.bias_counts += tokens_per_expert
        if (self.training and cfg.capacity_policy == "adaptive" and not self.uniform_routing
                and not self.recomputing):
            self.capacity_counts += tokens_per_expert.view(cfg.n_expert_groups, -1).sum(dim=1)
        self.aux_loss = (self.balance_loss(routing, B, S, real_T) if self.training
                         else x.new_zeros((), dtype=torch.float32))
        entropy = None
        if self.training and routing.scores_TE is not None:  # for the logs: how spread out routing is
            entropy = balance.routing_entropy(routing.scores_TE.detach().unsqueeze(0)).detach()
        self.last_stats = MoEStats(tokens_per_expert.detach(), dispatched.dropped, routing.indices_TK.numel(),
                                   entropy)
        return y_TD.view(x.shape)

    def one_call_operands(self) -> FFNOperands | None:
        """This layer as a whole block's call takes it (kernels/block_one_token.py): where a forward would take
        the experts' one call (inference, the local dispatcher, no uniform routing, no dropping), nothing hooks
        this layer and the experts offer their operands; None otherwise."""
        if (self.training or self.uniform_routing or self.drops_tokens or self._forward_hooks
                or self._forward_pre_hooks or self._one_token_call() is None):
            return None
        operands = getattr(self.experts, "one_call_operands", None)
        return operands(self.gate, self.shared_experts) if callable(operands) else None

    def record_one_call(self, tokens_per_expert: torch.Tensor, n_assignments: int) -> None:
        """What a forward leaves behind (``aux_loss``, ``last_stats``), for a step a whole block's call served
        (on the CPU)."""
        self.aux_loss, no_drops = self._inference_zeros(tokens_per_expert)
        self.last_stats = MoEStats(tokens_per_expert, no_drops, n_assignments)

    def _inference_zeros(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The zero loss (fp32) and zero drops (int64) an inference forward reports, made once on x's device
        rather than twice a decode step (nothing writes them in place)."""
        zeros = self._zeros
        if zeros is None or zeros[0].device != x.device:
            with torch.inference_mode(False):  # made in a decode step, used outside one too
                zeros = (torch.zeros((), device=x.device), torch.zeros((), dtype=torch.int64, device=x.device))
            self._zeros = zeros
        return zeros

    def _one_token_call(self) -> Callable[..., Any] | None:
        """The experts' one-call layer (``layer_one_token``), if they offer one, the dispatcher is the local one
        (expert parallelism replaces it with an all-to-all one, which the call does not know) and nothing traces
        the forward (asked before any shape test, which would become a guard of the traced graph)."""
        call = getattr(self.experts, "layer_one_token", None)
        if not callable(call) or type(self.dispatcher) is not LocalDispatcher or not fast_paths_enabled():
            return None
        return call

    def replay(self) -> Replay:
        """For activation checkpointing: contexts that make a recompute of a forward repeat it exactly."""
        return Replay(self)

    def _real_tokens(self, token_mask: torch.Tensor | None, B: int, S: int) -> torch.Tensor | None:
        """(B*S,) bool of the real tokens, or None when every token is real (the fast path)."""
        if token_mask is None:
            return None
        if token_mask.numel() != B * S or token_mask.shape[-1] != S:
            raise ValueError(f"token_mask must have shape ({B}, {S}) like the input's tokens, "
                             f"got {tuple(token_mask.shape)}")
        real_T = token_mask.reshape(B * S).to(torch.bool)
        return None if bool(real_T.all()) else real_T

    def balance_loss(self, routing: Routing, B: int, S: int, real_T: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of the enabled balance losses for this forward (zero under uniform routing). ``routing`` covers
        the real tokens only; ``real_T`` (B*S,) says where they sit (None: all B*S are real)."""
        cfg = self.cfg
        loss = torch.zeros((), device=routing.indices_TK.device)
        if routing.scores_TE is None:
            return loss
        scores_TE, indices_TK, mask_BS = routing.scores_TE, routing.indices_TK, None
        if real_T is not None:  # back to the (B, S) layout, padding rows masked out of every loss
            where = real_T.nonzero().flatten()
            scores_TE = scores_TE.new_zeros(B * S, scores_TE.shape[1]).index_copy(0, where, scores_TE)
            indices_TK = indices_TK.new_zeros(B * S, indices_TK.shape[1]).index_copy(0, where, indices_TK)
            mask_BS = real_T.view(B, S)
        per_sequence = (scores_TE.view(B, S, -1), indices_TK.view(B, S, -1), mask_BS)
        whole_batch = (scores_TE.unsqueeze(0), indices_TK.unsqueeze(0), None if mask_BS is None else mask_BS.view(1, -1))
        scores_BSE, indices_BSK, token_mask_BS = per_sequence if cfg.balance_loss_scope == "sequence" else whole_batch
        # Batch scope under expert parallelism: selection counts are the whole (all ranks') batch's.
        group_sum = self.dispatcher.batch_sum if cfg.balance_loss_scope == "batch" else None
        G, M = cfg.n_expert_groups, cfg.n_limited_groups
        if cfg.expert_loss_alpha > 0:
            loss = loss + balance.expert_balance_loss(scores_BSE, indices_BSK, cfg.expert_loss_alpha,
                                                      token_mask_BS=token_mask_BS, group_sum=group_sum)
        if cfg.device_loss_alpha > 0:
            loss = loss + balance.device_balance_loss(scores_BSE, indices_BSK, G, cfg.device_loss_alpha,
                                                      token_mask_BS=token_mask_BS, group_sum=group_sum)
        if cfg.comm_loss_alpha > 0:
            loss = loss + balance.communication_balance_loss(scores_BSE, indices_BSK, G, M, cfg.comm_loss_alpha,
                                                             token_mask_BS=token_mask_BS, group_sum=group_sum)
        if cfg.seq_loss_alpha > 0:  # V3's complementary loss is sequence-wise whatever the scope of the others
            loss = loss + balance.sequence_balance_loss(*per_sequence[:2], cfg.seq_loss_alpha,
                                                        token_mask_BS=mask_BS)
        if cfg.entropy_loss_alpha > 0 and self.entropy_scale > 0:  # per token: the scope does not matter
            loss = loss + balance.routing_entropy_loss(per_sequence[0], cfg.entropy_loss_alpha * self.entropy_scale,
                                                       token_mask_BS=mask_BS)
        return loss


class Replay:
    """Record the layer's random state when a checkpointed forward starts (``record``); during the recompute in
    the backward (``recompute``), draw from that same state, count nothing, and afterwards put back what the
    first forward left: the generator's state, ``aux_loss``, ``last_stats``, the dispatcher's statistics."""

    def __init__(self, moe: MoE) -> None:
        self.moe = moe
        self.before: tuple[torch.device, torch.Tensor] | None = None

    def _state(self) -> tuple[torch.device, torch.Tensor] | None:
        gen = self.moe._generator
        return None if gen is None else (gen.device, gen.get_state())

    def _set_state(self, state: tuple[torch.device, torch.Tensor] | None) -> None:
        if state is None:
            self.moe._generator = None
        else:
            self.moe.generator(state[0]).set_state(state[1])

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        self.before = self._state()
        yield

    @contextlib.contextmanager
    def recompute(self) -> Iterator[None]:
        moe = self.moe
        after, kept = self._state(), (moe.aux_loss, moe.last_stats)
        stats = copy.deepcopy(getattr(moe.dispatcher, "stats", None))
        self._set_state(self.before)
        moe.recomputing = True
        try:
            yield
        finally:
            moe.recomputing = False
            self._set_state(after)
            moe.aux_loss, moe.last_stats = kept
            if stats is not None:
                moe.dispatcher.stats = stats  # type: ignore[attr-defined]
