"""Frozen, validated configuration dataclasses: MoEConfig and ModelConfig.

Field names follow DeepSeek's own inference code (``dim``, ``moe_inter_dim``, ``n_routed_experts``, ...).
Every default is defined once, here. Validation raises ``ValueError`` naming the field, its value and the rule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} ({value!r}) must be a positive integer")


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, int | float) and not isinstance(value, bool) and value >= 0,
                 f"{name} ({value!r}) must be >= 0")


def _one_of(obj: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    _require(value in allowed, f"{name} ({value!r}) must be one of {', '.join(map(repr, allowed))}")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """One DeepSeekMoE layer.

    Routed experts are placed contiguously in ``n_expert_groups`` (G) groups; a group is what DeepSeek-V2 calls a
    "device" (its D and M are our G and M) for group-limited routing, the device and communication balance
    losses and token dropping. With expert parallelism each rank holds whole groups.
    """

    dim: int
    moe_inter_dim: int
    n_routed_experts: int
    n_activated_experts: int
    n_shared_experts: int = 0

    # Group-limited routing: a token may use experts of at most ``n_limited_groups`` (M) groups. None (the
    # default) means no limit and resolves to M = n_expert_groups; to_dict() writes None back for M == G, so
    # that "no limit" survives a later change of G.
    n_expert_groups: int = 1
    n_limited_groups: int = None  # type: ignore[assignment]  # always an int once constructed
    # How a group is ranked: its highest affinity (DeepSeek-V2) or the sum of its two highest
    # bias-corrected scores (DeepSeek-V3).
    group_score_func: Literal["max", "top2_sum"] = "max"

    score_func: Literal["softmax", "sigmoid"] = "softmax"
    route_scale: float = 1.0
    norm_topk_prob: bool = False

    # Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for choosing only.
    use_routing_bias: bool = False
    bias_update_speed: float = 0.001

    # Balance losses (DeepSeek-V2 §2.2.1–2.2.3) and V3's complementary sequence-wise loss.
    expert_loss_alpha: float = 0.001
    device_loss_alpha: float = 0.0
    comm_loss_alpha: float = 0.0
    seq_loss_alpha: float = 0.0
    balance_loss_scope: Literal["sequence", "batch"] = "sequence"

    # Token dropping against a per-device budget of capacity_factor * K * T / D assignments (None: never).
    capacity_factor: float | None = None
    drop_at_inference: bool = False
    protected_fraction: float = 0.1
    # "adaptive": capacity_factor is only the start; after each optimizer step the training loop moves the factor
    # toward the one that would have dropped ``capacity_target_drop`` of the step's assignments, by
    # ``capacity_update_rate``, within [capacity_min, capacity_max] (moe/capacity.py).
    capacity_policy: Literal["fixed", "adaptive"] = "fixed"
    capacity_min: float = 1.0
    capacity_max: float = 2.0
    capacity_target_drop: float = 0.01
    capacity_update_rate: float = 0.1

    # Routing-entropy regulariser (moe/balance.py routing_entropy_loss): rewards spread-out routing so that it
    # does not collapse early; the training loop scales it down over the run (RoutingConfig.entropy_decay_fraction).
    entropy_loss_alpha: float = 0.0

    # Uniform routing warm-up: K experts drawn uniformly at random, gates 1/K, no router gradient.
    uniform_routing: bool = False
    seed: int = 0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_limited_groups is None:
            object.__setattr__(self, "n_limited_groups", self.n_expert_groups)
        _positive(self, "dim", "moe_inter_dim", "n_routed_experts", "n_activated_experts",
                  "n_expert_groups", "n_limited_groups")
        _non_negative(self, "n_shared_experts", "route_scale", "bias_update_speed", "expert_loss_alpha",
                      "device_loss_alpha", "comm_loss_alpha", "seq_loss_alpha", "init_std", "entropy_loss_alpha")
        _one_of(self, "score_func", ("softmax", "sigmoid"))
        _one_of(self, "capacity_policy", ("fixed", "adaptive"))
        _one_of(self, "group_score_func", ("max", "top2_sum"))
        _one_of(self, "balance_loss_scope", ("sequence", "batch"))
        _require(self.n_activated_experts <= self.n_routed_experts,
                 f"n_activated_experts ({self.n_activated_experts}) must be <= n_routed_experts "
                 f"({self.n_routed_experts})")
        _require(self.n_routed_experts % self.n_expert_groups == 0,
                 f"n_expert_groups ({self.n_expert_groups}) must divide n_routed_experts "
                 f"({self.n_routed_experts})")
        _require(self.n_limited_groups <= self.n_expert_groups,
                 f"n_limited_groups ({self.n_limited_groups}) must be <= n_expert_groups "
                 f"({self.n_expert_groups})")
        available = self.n_limited_groups * self.experts_per_group
        _require(self.n_activated_experts <= available,
                 f"n_activated_experts ({self.n_activated_experts}) must be <= n_limited_groups * experts per "
                 f"group ({self.n_limited_groups} * {self.experts_per_group} = {available})")
        if self.group_score_func == "top2_sum" and self.n_expert_groups > 1:
            _require(self.experts_per_group >= 2,
                     f"group_score_func ('top2_sum') needs >= 2 experts per group, got {self.experts_per_group}")
        if self.capacity_factor is not None:
            _require(isinstance(self.capacity_factor, int | float) and self.capacity_factor > 0
                     and math.isfinite(self.capacity_factor),
                     f"capacity_factor ({self.capacity_factor!r}) must be a positive number or None")
        if self.capacity_policy == "adaptive":
            self._check_adaptive_capacity()
        _require(0.0 <= self.protected_fraction <= 1.0,
                 f"protected_fraction ({self.protected_fraction!r}) must be in [0, 1]")

    def _check_adaptive_capacity(self) -> None:
        _require(self.capacity_factor is not None,
                 "capacity_policy ('adaptive') needs capacity_factor, the factor it starts from (None never drops)")
        lo, hi = self.capacity_min, self.capacity_max
        _require(all(isinstance(v, int | float) and math.isfinite(v) for v in (lo, hi)) and 0 < lo <= hi,
                 f"capacity_min ({lo!r}) and capacity_max ({hi!r}) must be finite with 0 < capacity_min <= "
                 "capacity_max")
        _require(lo <= self.capacity_factor <= hi,  # type: ignore[operator]
                 f"capacity_factor ({self.capacity_factor}) must be within [capacity_min, capacity_max] "
                 f"([{lo}, {hi}]) under capacity_policy 'adaptive'")
        _require(all(isinstance(getattr(self, f), int | float) and not isinstance(getattr(self, f), bool)
                     for f in ("capacity_target_drop", "capacity_update_rate")),
                 f"capacity_target_drop ({self.capacity_target_drop!r}) and capacity_update_rate "
                 f"({self.capacity_update_rate!r}) must be numbers")
        _require(0.0 <= self.capacity_target_drop < 1.0,
                 f"capacity_target_drop ({self.capacity_target_drop!r}) must be in [0, 1)")
        _require(0.0 < self.capacity_update_rate <= 1.0,
                 f"capacity_update_rate ({self.capacity_update_rate!r}) must be in (0, 1]")

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_expert_groups

    @property
    def group_limited(self) -> bool:
        return self.n_limited_groups < self.n_expert_groups

    @classmethod
    def from_conventional(cls, *, dim: int, inter_dim: int, n_experts: int, top_k: int, segmentation: int,
                          n_shared: int = 0, n_expert_groups: int = 1, n_limited_groups: int | None = None,
                          **overrides: Any) -> MoEConfig:
        """DeepSeekMoE from a conventional top-K MoE with the same total and activated parameters.

        Each of the ``n_experts`` experts of hidden width ``inter_dim`` is split into ``segmentation`` (m)
        experts of width ``inter_dim / m``; ``m * top_k`` are activated, of which ``n_shared`` (K_s) are
        isolated as shared experts. So mN - K_s routed experts, mK - K_s of them activated per token, in
        ``n_expert_groups`` groups of which a token may use ``n_limited_groups`` (None: all, no group limit).
        """
        _require(segmentation > 0 and inter_dim % segmentation == 0,
                 f"segmentation ({segmentation}) must be a positive divisor of inter_dim ({inter_dim})")
        _require(0 <= n_shared < segmentation * top_k,
                 f"n_shared ({n_shared}) must be < segmentation * top_k ({segmentation * top_k})")
        return cls(dim=dim, moe_inter_dim=inter_dim // segmentation,
                   n_routed_experts=segmentation * n_experts - n_shared,
                   n_activated_experts=segmentation * top_k - n_shared, n_shared_experts=n_shared,
                   n_expert_groups=n_expert_groups,
                   n_limited_groups=n_expert_groups if n_limited_groups is None else n_limited_groups,
                   **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The fields, with ``n_limited_groups`` None when there is no group limit (M == G)."""
        data = dataclasses.asdict(self)
        if self.n_limited_groups == self.n_expert_groups:
            data["n_limited_groups"] = None
        return data

    def replace(self, **changes: Any) -> MoEConfig:
        """A copy with ``changes``; a config without a group limit keeps none when only G changes."""
        return moe_config_from_dict({**self.to_dict(), **changes})


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A DeepSeekMoE causal language model (DeepSeekMoE, DeepSeek-V2 and DeepSeek-V3 shapes).

    The first ``n_dense_layers`` blocks use a dense SwiGLU FFN of width ``inter_dim``; the rest use the MoE
    layer described by ``moe`` (whose ``dim`` must equal ``dim``).
    """

    vocab_size: int
    dim: int
    inter_dim: int
    n_layers: int
    n_dense_layers: int
    n_heads: int
    moe: MoEConfig
    max_seq_len: int = 4096

    # Attention: Multi-head Latent Attention, or standard multi-head attention of the same head shapes.
    attention: Literal["mla", "mha"] = "mla"
    # How MLA runs over a cache: "absorb" keeps only the latent and the RoPE key and folds the up-projections
    # into the query and output; "naive" re-expands keys and values from the cached latent.
    attn_impl: Literal["naive", "absorb"] = "absorb"
    # Biases on the projections that read the residual stream or write it: MLA's wq_a, wkv_a and wo (never wq,
    # wq_b or wkv_b, as transformers' DeepSeek-V2/V3 have them), MHA's wq, wk, wv and wo (LLaMA's).
    attention_bias: bool = False
    q_lora_rank: int = 0  # 0: queries are projected directly, without a low-rank bottleneck
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    # Rotary embeddings; YaRN when rope_factor > 1.
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # rotate adjacent pairs (DeepSeek); False: split halves
    rope_factor: float = 1.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    # Multi-token prediction (DeepSeek-V3 §2.2): mtp_depth (D) sequential modules after the main model, module k
    # predicting token i+k+1; their loss, weighted mtp_lambda / D, joins the training loss. 0: none.
    mtp_depth: int = 0
    mtp_lambda: float = 0.3  # V3's weight for its first 10T tokens (a training schedule may change it per step)

    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "dim", "inter_dim", "n_layers", "n_heads", "max_seq_len",
                  "qk_rope_head_dim", "v_head_dim", "original_seq_len")
        _non_negative(self, "n_dense_layers", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "norm_eps",
                      "init_std", "mscale", "mscale_all_dim", "mtp_lambda")
        _require(isinstance(self.mtp_depth, int) and not isinstance(self.mtp_depth, bool) and self.mtp_depth >= 0,
                 f"mtp_depth ({self.mtp_depth!r}) must be an integer >= 0")
        _require(math.isfinite(self.mtp_lambda), f"mtp_lambda ({self.mtp_lambda!r}) must be finite")
        _one_of(self, "attention", ("mla", "mha"))
        _one_of(self, "attn_impl", ("naive", "absorb"))
        _require(isinstance(self.attention_bias, bool), f"attention_bias ({self.attention_bias!r}) must be a bool")
        _require(isinstance(self.moe, MoEConfig), f"moe ({type(self.moe).__name__}) must be a MoEConfig")
        _require(self.moe.dim == self.dim, f"moe.dim ({self.moe.dim}) must equal dim ({self.dim})")
        _require(self.n_dense_layers <= self.n_layers,
                 f"n_dense_layers ({self.n_dense_layers}) must be <= n_layers ({self.n_layers})")
        _require(self.attention == "mha" or self.kv_lora_rank > 0,
                 f"kv_lora_rank ({self.kv_lora_rank}) must be positive for attention='mla'")
        _require(self.qk_rope_head_dim % 2 == 0,
                 f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even (rotary pairs)")
        _require(self.rope_theta > 0, f"rope_theta ({self.rope_theta}) must be > 0")
        _require(self.rope_factor >= 1.0, f"rope_factor ({self.rope_factor}) must be >= 1 (1 disables YaRN)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "moe": self.moe.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        moe = data.pop("moe")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        _require(not unknown, f"unknown ModelConfig field(s): {', '.join(sorted(unknown))}")
        moe_cfg = moe if isinstance(moe, MoEConfig) else moe_config_from_dict(moe)
        return cls(moe=moe_cfg, **data)


def moe_config_from_dict(data: dict[str, Any]) -> MoEConfig:
    unknown = set(data) - {f.name for f in dataclasses.fields(MoEConfig)}
    _require(not unknown, f"unknown MoEConfig field(s): {', '.join(sorted(unknown))}")
    return MoEConfig(**data)


__all__ = ["MoEConfig", "ModelConfig", "moe_config_from_dict"]
