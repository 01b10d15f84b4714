"""The DeepSeekMoE layer: shared experts every token passes through, plus fine-grained routed experts.

    MoE(u) = Σ_{i ≤ K_s} FFN_i(u) + Σ_{i} g_{i,t} FFN_i(u)

The residual (h = u + MoE(u)) is added by the transformer block, not here, so the layer drops into any network.
"""

from __future__ import annotations

import torch
from torch import nn

from deepseek_moe.config import MoEConfig
from deepseek_moe.moe import balance
from deepseek_moe.moe.dispatch import Dispatcher, DropPlan, LocalDispatcher
from deepseek_moe.moe.dropping import choose_protected_sequences
from deepseek_moe.moe.experts import FeedForward, RoutedExperts
from deepseek_moe.moe.router import Router, Routing
from deepseek_moe.moe.stats import MoEStats

_LAYER_SEED_STRIDE = 1_000_003  # decorrelates the random draws of layers that share a config


class MoE(nn.Module):
    """A DeepSeekMoE layer that knows only its config.

    ``forward(x)`` takes (B, S, dim) or (S, dim) (one sequence) and returns a tensor of the same shape. After each
    forward, ``aux_loss`` holds the balance losses (0-dim, in the graph; zero when none is on or not training)
    and ``last_stats`` a :class:`MoEStats`. ``uniform_routing`` switches the uniform warm-up at run time.
    ``dispatcher`` is swappable (expert parallelism replaces it with an all-to-all one).
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
        # Selection counts since the last routing-bias update (all micro-batches of one optimizer step).
        self.bias_counts: torch.Tensor
        self.register_buffer("bias_counts", torch.zeros(cfg.n_routed_experts), persistent=False)
        self._generator: torch.Generator | None = None

    def reset_parameters(self) -> None:
        """Re-initialise in place (after ``to_empty`` from the meta device, say); the FFNs' Linears are
        initialised by whoever owns the init scheme (the model's reset_parameters, or nn.Linear's own)."""
        self.gate.reset_parameters()
        self.experts.reset_parameters()
        self.bias_counts.zero_()
        self._generator = None

    @property
    def seed(self) -> int:
        return self.cfg.seed + _LAYER_SEED_STRIDE * self.layer_id

    def generator(self, device: torch.device) -> torch.Generator:
        """The seeded generator of uniform routing and of the protected-sequence draw."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if x.dim() not in (2, 3) or x.shape[-1] != cfg.dim:
            raise ValueError(f"MoE input must have shape (B, S, {cfg.dim}) or (S, {cfg.dim}), got {tuple(x.shape)}")
        x_BSD = x if x.dim() == 3 else x.unsqueeze(0)
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        dropping = cfg.capacity_factor is not None and (self.training or cfg.drop_at_inference)
        # Where this batch sits in the batch that batch-wide draws cover (a collective under expert parallelism,
        # so asked once, and only when a draw needs it).
        span = self.dispatcher.batch_span(B, B * S) if self.uniform_routing or dropping else None

        if span is not None and self.uniform_routing:
            # Drawn over the whole batch and sliced, as for the protected sequences: under expert parallelism
            # the ranks' tokens get the draws one process would give them, not all the same ones.
            routing = self.gate.uniform(span.n_tokens, self.generator(x.device), x.device)
            first = span.first_sequence * S
            routing = Routing(routing.indices_TK[first:first + B * S], routing.weights_TK[first:first + B * S], None)
        else:
            routing = self.gate(x_TD)

        drop = None
        if span is not None and dropping:
            assert cfg.capacity_factor is not None  # implied by dropping; narrows the type
            # The protected draw is over the whole batch (all ranks' sequences under expert parallelism, each
            # rank drawing the same mask from the same seed), so it is the choice one process would make.
            protected_B = choose_protected_sequences(span.n_sequences, cfg.protected_fraction,
                                                     self.generator(x.device))
            protected_B = protected_B[span.first_sequence:span.first_sequence + B]
            drop = DropPlan(cfg.capacity_factor, cfg.n_expert_groups, protected_B.repeat_interleave(S),
                            n_tokens=span.n_tokens)
        dispatched = self.dispatcher(x_TD, routing, self.experts, drop)
        y_TD = dispatched.y_TD
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)

        tokens_per_expert = torch.bincount(routing.indices_TK.reshape(-1), minlength=cfg.n_routed_experts)
        if self.training and cfg.use_routing_bias:
            self.bias_counts += tokens_per_expert
        self.aux_loss = self.balance_loss(routing, B, S) if self.training else x.new_zeros((), dtype=torch.float32)
        self.last_stats = MoEStats(tokens_per_expert.detach(), dispatched.dropped, routing.indices_TK.numel())
        return y_TD.view(x.shape)

    def balance_loss(self, routing: Routing, B: int, S: int) -> torch.Tensor:
        """Sum of the enabled balance losses for this forward (zero under uniform routing)."""
        cfg = self.cfg
        loss = torch.zeros((), device=routing.indices_TK.device)
        if routing.scores_TE is None:
            return loss
        per_sequence = (routing.scores_TE.view(B, S, -1), routing.indices_TK.view(B, S, -1))
        scores_BSE, indices_BSK = (per_sequence if cfg.balance_loss_scope == "sequence"
                                   else (routing.scores_TE.unsqueeze(0), routing.indices_TK.unsqueeze(0)))
        # Batch scope under expert parallelism: selection counts are the whole (all ranks') batch's.
        group_sum = self.dispatcher.batch_sum if cfg.balance_loss_scope == "batch" else None
        if cfg.expert_loss_alpha > 0:
            loss = loss + balance.expert_balance_loss(scores_BSE, indices_BSK, cfg.expert_loss_alpha,
                                                      group_sum=group_sum)
        if cfg.device_loss_alpha > 0:
            loss = loss + balance.device_balance_loss(scores_BSE, indices_BSK, cfg.n_expert_groups,
                                                      cfg.device_loss_alpha, group_sum=group_sum)
        if cfg.comm_loss_alpha > 0:
            loss = loss + balance.communication_balance_loss(scores_BSE, indices_BSK, cfg.n_expert_groups,
                                                             cfg.n_limited_groups, cfg.comm_loss_alpha,
                                                             group_sum=group_sum)
        if cfg.seq_loss_alpha > 0:  # V3's complementary loss is sequence-wise whatever the scope of the others
            loss = loss + balance.sequence_balance_loss(*per_sequence, cfg.seq_loss_alpha)
        return loss
