"""The ablation's models: one base shape, eight FFNs (DeepSeekMoE §4.1–4.3, Fig. 3 and Table 1).

Everything but the FFN of the MoE layers is shared: embedding, attention, norms, head, and the first layer, a
dense SwiGLU of the activated width 2W in every variant. From a conventional MoE of N experts of width W with
top-2 routing (GShard):

    dense              every layer dense, width 2W                     (activated 2W, total 2W)
    gshard             top-2 of N experts of width W                   (activated 2W, total NW)
    shared             1 shared + top-1 of N-1 routed, width W          (activated 2W, total NW)
    fine_grained_m2    1 shared + top-3 of 2N-1 routed, width W/2       (activated 2W, total NW)
    deepseekmoe        1 shared + top-(2m-1) of mN-1 routed, width W/m  (activated 2W, total NW)
    fine_grained_only  top-2m of mN routed, width W/m, no shared        (activated 2W, total NW)
    dense_total        dense of width NW in the MoE layers              (activated NW, total NW)
    gshard_x1.5        top-2 of N experts of width 1.5W                 (activated 3W, total 1.5NW)

Balance variants (not in the default set; ``deepseek-moe ablate --balance``), each ``deepseekmoe`` with one change:

    deepseekmoe_drop      token dropping at a fixed capacity factor 1.0 (DeepSeek-V2 §2.2.4)
    deepseekmoe_adaptive  dropping at an adaptive factor: starts at 1.0, moves within [0.75, 1.5] toward 1% drops
    deepseekmoe_entropy   the routing-entropy regulariser, α = 0.05, decaying over the first half of training

The two dropping variants give each routed expert its own group (G = E, no group limit), so the budget is per
expert (c K T / E assignments): with the single group of the other variants nothing could ever be dropped.

The MoE layers of ``dense_total`` are built as N-1 shared experts plus one routed expert that every token
takes with gate 1 (softmax over a single expert): a SwiGLU is a sum over its hidden units, so this is exactly
a dense FFN of width NW. It keeps the first layer identical to the others' without a second dense width in
ModelConfig; the one-row router (``dim`` parameters per layer, gradient zero) is counted and printed.

All MoE variants: softmax affinities, no group limit, no token dropping, no routing bias, the same
expert-level balance loss (DeepSeekMoE eq. 12) with the same α.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deepseek_moe.config import ModelConfig, MoEConfig, _require
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.model.counting import count_parameters, flops_per_token
from deepseek_moe.moe.layer import MoE

VARIANTS: tuple[str, ...] = ("dense", "gshard", "shared", "fine_grained_m2", "deepseekmoe", "fine_grained_only",
                             "dense_total", "gshard_x1.5")
BALANCE_VARIANTS: tuple[str, ...] = ("deepseekmoe_drop", "deepseekmoe_adaptive", "deepseekmoe_entropy")
# What each balance variant changes in deepseekmoe's MoEConfig.
_BALANCE_CHANGES: dict[str, dict[str, Any]] = {
    "deepseekmoe_drop": {"capacity_factor": 1.0, "n_expert_groups": "E"},
    "deepseekmoe_adaptive": {"capacity_factor": 1.0, "capacity_policy": "adaptive", "capacity_min": 0.75,
                             "capacity_max": 1.5, "capacity_target_drop": 0.01, "n_expert_groups": "E"},
    "deepseekmoe_entropy": {"entropy_loss_alpha": 0.05},
}
TOP_K = 2  # the conventional MoE every variant is derived from routes each token to 2 of N experts (GShard)


@dataclass(frozen=True, kw_only=True)
class AblationShape:
    """The base model: a conventional top-2 MoE of ``n_experts`` (N) experts of width ``expert_dim`` (W)."""

    dim: int = 128
    n_layers: int = 4  # the first dense, the rest MoE
    n_heads: int = 4
    n_experts: int = 8  # N
    expert_dim: int = 256  # W (2W = 4 dim activated per token)
    segmentation: int = 4  # m of ``deepseekmoe`` and ``fine_grained_only``
    expert_loss_alpha: float = 0.01  # α of the expert-level balance loss, the same for every MoE variant
    vocab_size: int = 4096  # replaced by the tokenizer's when trained

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_experts", "expert_dim", "segmentation", "vocab_size"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"{name} ({value!r}) must be a positive integer")
        _require(self.n_layers >= 2, f"n_layers ({self.n_layers}) must be >= 2 (a dense first layer, then MoE)")
        _require(self.n_experts >= 2, f"n_experts ({self.n_experts}) must be >= 2 (top-2 routing)")
        _require(self.dim % self.n_heads == 0, f"n_heads ({self.n_heads}) must divide dim ({self.dim})")
        for m in (2, self.segmentation):
            _require(self.expert_dim % m == 0, f"expert_dim ({self.expert_dim}) must be divisible by the "
                     f"segmentation {m}")
        _require(self.expert_dim % 2 == 0, f"expert_dim ({self.expert_dim}) must be even (gshard_x1.5's 1.5W)")
        _require(self.expert_loss_alpha >= 0, f"expert_loss_alpha ({self.expert_loss_alpha}) must be >= 0")


def _base(shape: AblationShape, moe: MoEConfig, *, all_dense: bool = False) -> ModelConfig:
    head_dim = shape.dim // shape.n_heads
    return ModelConfig(
        vocab_size=shape.vocab_size, dim=shape.dim, inter_dim=TOP_K * shape.expert_dim, n_layers=shape.n_layers,
        n_dense_layers=shape.n_layers if all_dense else 1, n_heads=shape.n_heads, moe=moe,
        q_lora_rank=0, kv_lora_rank=head_dim * 2, qk_nope_head_dim=head_dim, qk_rope_head_dim=head_dim // 2,
        v_head_dim=head_dim, max_seq_len=512, original_seq_len=512)


def variant_config(name: str, shape: AblationShape) -> ModelConfig:
    """The ModelConfig of variant ``name`` (one of VARIANTS)."""
    if name not in (*VARIANTS, *BALANCE_VARIANTS):
        raise ValueError(f"unknown ablation variant {name!r}; valid: {', '.join((*VARIANTS, *BALANCE_VARIANTS))}")
    s = shape
    common: dict[str, Any] = {"expert_loss_alpha": s.expert_loss_alpha}

    def conventional(width: int, segmentation: int, n_shared: int) -> MoEConfig:
        return MoEConfig.from_conventional(dim=s.dim, inter_dim=width, n_experts=s.n_experts, top_k=TOP_K,
                                           segmentation=segmentation, n_shared=n_shared, **common)

    if name == "dense":
        return _base(s, conventional(s.expert_dim, 1, 0), all_dense=True)
    if name == "gshard":
        return _base(s, conventional(s.expert_dim, 1, 0))
    if name == "shared":
        return _base(s, conventional(s.expert_dim, 1, 1))
    if name == "fine_grained_m2":
        return _base(s, conventional(s.expert_dim, 2, 1))
    if name == "deepseekmoe":
        return _base(s, conventional(s.expert_dim, s.segmentation, 1))
    if name in BALANCE_VARIANTS:
        moe = conventional(s.expert_dim, s.segmentation, 1)
        changes = {k: moe.n_routed_experts if v == "E" else v for k, v in _BALANCE_CHANGES[name].items()}
        return _base(s, moe.replace(**changes))
    if name == "fine_grained_only":
        return _base(s, conventional(s.expert_dim, s.segmentation, 0))
    if name == "gshard_x1.5":
        return _base(s, conventional(s.expert_dim * 3 // 2, 1, 0))
    # dense_total: N-1 shared experts + 1 routed expert taken with gate 1 = one dense FFN of width NW. No balance
    # loss: with one expert it is a constant (no gradient) that would only offset the logged loss.
    return _base(s, MoEConfig(dim=s.dim, moe_inter_dim=s.expert_dim, n_routed_experts=1, n_activated_experts=1,
                              n_shared_experts=s.n_experts - 1, expert_loss_alpha=0.0))


@dataclass(frozen=True)
class Counts:
    """Parameters of one variant, counted from its modules (model.counting plus the MoE layers' FFNs)."""

    total_params: int  # the whole model (count_parameters)
    activated_params: int  # per token, the input embedding excluded (count_parameters)
    ffn_total: int  # FFN weights of the MoE layers (routed + shared experts; all FFN weights when dense)
    ffn_activated: int  # of those, the ones a token uses
    router_params: int  # gate weights of the MoE layers
    flops_per_token: int  # forward, attention over half the context on average


def count_variant(cfg: ModelConfig, *, seq_len: int) -> Counts:
    """Counts of ``cfg``; the FFN figures cover layers 1.. (the first layer is the same in every variant)."""
    total, activated = count_parameters(cfg)
    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(cfg)
    ffn_total = ffn_activated = router = 0
    for block in list(model.layers)[1:]:
        layer = block.get_submodule("ffn")
        if not isinstance(layer, MoE):  # dense: every weight is used by every token
            n = sum(int(p.numel()) for p in layer.parameters())
            ffn_total, ffn_activated = ffn_total + n, ffn_activated + n
            continue
        routed = sum(p.numel() for p in layer.experts.parameters())
        shared = sum(p.numel() for p in layer.shared_experts.parameters()) if layer.shared_experts is not None else 0
        ffn_total += routed + shared
        ffn_activated += routed // layer.cfg.n_routed_experts * layer.cfg.n_activated_experts + shared
        router += sum(p.numel() for p in layer.gate.parameters())
    return Counts(total, activated, ffn_total, ffn_activated, router, flops_per_token(cfg, seq_len // 2))


def model_overrides(cfg: ModelConfig) -> dict[str, Any]:
    """``cfg`` as ``model.overrides`` of a TrainConfig (everything but what training sets itself)."""
    data = cfg.to_dict()
    for key in ("vocab_size", "eos_token_id", "bos_token_id"):
        data.pop(key)
    data["moe"].pop("seed")
    return data


__all__ = ["BALANCE_VARIANTS", "TOP_K", "VARIANTS", "AblationShape", "Counts", "count_variant", "model_overrides", "variant_config"]
