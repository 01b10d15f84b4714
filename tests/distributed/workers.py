"""What each rank runs in the distributed tests, and the single-process references they are compared with.

The same builders make the weights and data on every rank and in the reference, so a difference can only come
from the parallel path. A rank sees sequences [rank*B/W, (rank+1)*B/W) of the global batch; the reference is
the plain layer (or model) over the whole batch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from harness import rank_main

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.moe.bias import update_routing_bias
from deepseek_moe.moe.layer import MoE

B, S = 8, 5  # global batch of the layer cases


# ---------------------------------------------------------------- layer cases
def layer_cases(world: int) -> dict[str, MoEConfig]:
    base = dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_shared_experts=1, expert_loss_alpha=0.01,
                device_loss_alpha=0.02, comm_loss_alpha=0.03)
    G = world
    cases = {
        "free": MoEConfig(**base, n_activated_experts=3, n_expert_groups=G, n_limited_groups=G),
        "limit1_batch": MoEConfig(**base, n_activated_experts=2, n_expert_groups=G, n_limited_groups=1,
                                  balance_loss_scope="batch"),
        "drop_limited": MoEConfig(**base, n_activated_experts=2, n_expert_groups=G, n_limited_groups=max(1, G // 2),
                                  capacity_factor=0.5, protected_fraction=0.25),
        "drop_free_batch": MoEConfig(**base, n_activated_experts=3, n_expert_groups=G, n_limited_groups=G,
                                     capacity_factor=0.75, balance_loss_scope="batch", seq_loss_alpha=0.01),
        # two groups per rank, V3 routing: sigmoid, group top-2 sum, bias, normalised gates; dropping per group
        "v3_two_groups_per_rank": MoEConfig(
            **{**base, "n_routed_experts": 16}, n_activated_experts=4, n_expert_groups=2 * G,
            n_limited_groups=G if G > 1 else 1, score_func="sigmoid", group_score_func="top2_sum",
            norm_topk_prob=True, route_scale=2.0, use_routing_bias=True, capacity_factor=0.6,
            protected_fraction=0.2, balance_loss_scope="batch", seq_loss_alpha=0.01),
    }
    # Left-padded batches: ranks hold different numbers of real tokens (padding in no budget, count or loss).
    cases["padded_drop_batch"] = MoEConfig(**base, n_activated_experts=2, n_expert_groups=G, n_limited_groups=G,
                                           capacity_factor=0.5, protected_fraction=0.25, balance_loss_scope="batch")
    cases["padded_sequence"] = MoEConfig(**base, n_activated_experts=2, n_expert_groups=G,
                                         n_limited_groups=max(1, G // 2), seq_loss_alpha=0.01)
    if world >= 4:
        cases["limit2"] = MoEConfig(**base, n_activated_experts=3, n_expert_groups=G, n_limited_groups=2)
    return cases


def build_layer(cfg: MoEConfig) -> MoE:
    torch.manual_seed(0)
    moe = MoE(cfg, layer_id=3)
    if moe.gate.e_score_correction_bias is not None:
        moe.gate.e_score_correction_bias.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(7))
    return moe.train()


def layer_data(cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, S, cfg.dim, generator=g), torch.randn(B, S, cfg.dim, generator=g)


def layer_mask(case: str) -> torch.Tensor | None:
    """(B, S) real-token mask of the padded cases: left padding of 0..S-1 tokens, unequal across ranks (a fully
    padded sequence would leave a sequence-scope mean over fewer sequences on one rank than one process has)."""
    if not case.startswith("padded"):
        return None
    padding = [(3 * b) % S for b in range(B)]
    return torch.tensor([[s >= pad for s in range(S)] for pad in padding])


def layer_step(moe: MoE, x: torch.Tensor, w: torch.Tensor, aux_weight: float,
               mask: torch.Tensor | None = None) -> dict[str, Any]:
    """Two forwards (the second sees the generator state the first left) and one backward."""
    x = x.clone().requires_grad_()
    y1 = moe(x, token_mask=mask)
    aux1 = moe.aux_loss
    dropped = int(moe.last_stats.dropped)
    y2 = moe(x * 0.5, token_mask=mask)
    dropped += int(moe.last_stats.dropped)
    aux = aux1 + moe.aux_loss
    ((y1 * w).sum() + (y2 * w).sum() + aux * aux_weight).backward()
    return {"y": torch.cat([y1, y2]).detach(), "aux": aux.detach(), "x_grad": x.grad,
            "grads": {n: _local(p.grad).clone() for n, p in moe.named_parameters() if p.grad is not None},
            "dropped": dropped}


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local part (expert weights under expert parallelism); a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def layer_reference(cfg: MoEConfig, case: str = "") -> dict[str, Any]:
    moe = build_layer(cfg)
    x, w = layer_data(cfg)
    out = layer_step(moe, x, w, 1.0, layer_mask(case))
    update_routing_bias(moe)
    out["bias"] = None if moe.gate.e_score_correction_bias is None else moe.gate.e_score_correction_bias.clone()
    return out


def layer_cases_worker(rank: int, world: int) -> dict[str, Any]:
    from deepseek_moe.parallel import all_reduce_sum, expert_parameters, init_parallel, parallelize_experts

    ctx = init_parallel(timeout_s=30)  # joins once; a second call reuses the group
    results = {}
    for name, cfg in layer_cases(world).items():
        moe = parallelize_experts(build_layer(cfg), ctx)
        x, w = layer_data(cfg)
        b0, b1 = rank * B // world, (rank + 1) * B // world
        mask = layer_mask(name)
        # The global loss is the sum of the ranks' output terms plus the mean of their balance losses.
        out = layer_step(moe, x[b0:b1], w[b0:b1], 1.0 / world, None if mask is None else mask[b0:b1])
        sharded = {n for n, _ in expert_parameters(moe)}
        for n, g in out["grads"].items():
            if n not in sharded:
                dist.all_reduce(g)
        update_routing_bias(moe, all_reduce=all_reduce_sum(ctx.ep_group))
        out["bias"] = None if moe.gate.e_score_correction_bias is None else moe.gate.e_score_correction_bias.clone()
        out["sharded"] = sorted(sharded)
        out["stats"] = moe.dispatcher.stats
        out["cfg"] = cfg
        results[name] = out
    return results


# ---------------------------------------------------------------- full model
MB, MS = 4, 8  # global batch of the model case


def model_config(world: int) -> ModelConfig:
    return ModelConfig(vocab_size=64, dim=32, inter_dim=48, n_layers=3, n_dense_layers=1, n_heads=2,
                       q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                       max_seq_len=16, original_seq_len=16,
                       moe=MoEConfig(dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2,
                                     n_shared_experts=1, n_expert_groups=world, n_limited_groups=1,
                                     expert_loss_alpha=0.01, device_loss_alpha=0.01, capacity_factor=0.75,
                                     protected_fraction=0.25))


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM

    torch.manual_seed(0)
    return DeepSeekMoEForCausalLM(cfg).train()


def model_data(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (MB, MS), generator=torch.Generator().manual_seed(2))


def hybrid_config() -> ModelConfig:
    """For 4 ranks as 2 expert-parallel groups of 2 (ep=2, each expert slice FSDP-sharded over 2): dropping,
    batch-scope balance losses and the communication loss, all decided over the whole batch of the 4 ranks."""
    cfg = model_config(2)
    return cfg.replace(moe=cfg.moe.replace(balance_loss_scope="batch", comm_loss_alpha=0.01))


CLIP = 0.05  # max gradient norm of the model step: small enough to scale every gradient


def model_reference(world: int, cfg: ModelConfig | None = None) -> dict[str, Any]:
    from deepseek_moe.moe.all_layers import moe_layers

    cfg = cfg or model_config(world)
    model = build_model(cfg)
    ids = model_data(cfg)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    dropped = sum(int(moe.last_stats.dropped) for _, moe in moe_layers(model))
    model.eval()
    return {"loss": out.loss.detach(), "logits": out.logits.detach(), "grads": grads, "norm": norm,
            "dropped": dropped, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "eval_logits": model(ids).logits.detach()}


def fsdp_step(rank: int, world: int, cfg: ModelConfig, ep: int | None = None,
              activation_checkpointing: bool = False) -> dict[str, Any]:
    """The reference's step on the sharded model: forward on this rank's rows, backward, clip, SGD."""
    from deepseek_moe.model.block import set_activation_checkpointing
    from deepseek_moe.moe.all_layers import moe_layers
    from deepseek_moe.parallel import (
        clip_grad_norm_,
        expert_parameters,
        full_state_dict,
        init_parallel,
        shard_model,
    )

    ctx = init_parallel(ep, timeout_s=30)
    model = build_model(cfg)
    set_activation_checkpointing(model, activation_checkpointing)
    shard_model(model, ctx)
    ids = model_data(cfg)
    b0, b1 = rank * MB // world, (rank + 1) * MB // world
    out = model(ids[b0:b1], labels=ids[b0:b1])
    out.loss.backward()
    # Every parameter is a DTensor of the single-process shape: the gradients gathered are the full ones.
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    norm = clip_grad_norm_(model, CLIP)
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    dropped = torch.tensor(sum(int(moe.last_stats.dropped) for _, moe in moe_layers(model)))
    dist.all_reduce(dropped)
    return {"ctx": ctx, "model": model, "ids": ids, "rows": (b0, b1), "loss": loss / world,
            "logits": out.logits.detach(), "grads": grads, "norm": norm, "dropped": int(dropped),
            "sharded": sorted(n for n, _ in expert_parameters(model)), "state": full_state_dict(model),
            "ep_rank": ctx.ep_rank}


def model_worker(rank: int, world: int) -> dict[str, Any]:
    from deepseek_moe.io import save_pretrained
    from deepseek_moe.parallel import gathered_model, load_full_state_dict, shard_model

    cfg = model_config(world)
    step = fsdp_step(rank, world, cfg)
    model, ids, (b0, b1), state = step["model"], step["ids"], step["rows"], step["state"]
    model.eval()
    eval_logits = model(ids[b0:b1]).logits.detach()
    plain = gathered_model(model, build=rank == 0)  # a collective: every rank takes part
    result: dict[str, Any] = {k: step[k] for k in ("loss", "logits", "grads", "norm", "dropped", "sharded")}
    result["eval_logits"] = eval_logits
    if rank == 0:
        assert plain is not None
        result["state"] = state
        result["plain_eval_logits"] = plain.eval()(ids).logits.detach()
        export = os.environ.get("DSMOE_EXPORT")
        if export:
            save_pretrained(plain, export)
    # Scatter on load: a fresh sharded model takes the full state of the reference after its step.
    fresh = shard_model(build_model(cfg), step["ctx"])
    load_full_state_dict(fresh, state)
    result["reloaded_eval_logits"] = fresh.eval()(ids[b0:b1]).logits.detach()
    result["init"] = meta_init(step["ctx"])
    recomputed = fsdp_step(rank, world, cfg, activation_checkpointing=True)
    result["checkpointed"] = {k: recomputed[k] for k in ("loss", "logits", "grads", "norm", "dropped")}
    return result


def meta_init(ctx: Any) -> dict[str, dict[str, torch.Tensor]] | None:
    """A model built on the meta device, sharded, then materialised with each rank initialising its shards (and
    an orthogonal expert init on top): the full states, gathered, on rank 0."""
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
    from deepseek_moe.parallel import full_state_dict, local_shard, materialize, shard_model
    from deepseek_moe.train.routing import orthogonal_init_experts

    states = {}
    for name, cfg in init_configs(ctx.world_size).items():
        torch.manual_seed(0)
        with torch.device("meta"):
            model = DeepSeekMoEForCausalLM(cfg)
        materialize(shard_model(model, ctx), torch.device("cpu"))
        states[name] = full_state_dict(model)
        orthogonal_init_experts(model, shard_of=local_shard)
        states[name + "+orthogonal"] = full_state_dict(model)
    return states if ctx.rank == 0 else None


def init_configs(world: int) -> dict[str, ModelConfig]:
    """The model case, and one whose experts fit jointly in the model dimension (E * F <= D: one orthogonal
    draw for all experts) with tied embeddings."""
    cfg = model_config(world)
    joint = cfg.replace(tie_word_embeddings=True, moe=cfg.moe.replace(moe_inter_dim=4))
    return {"model": cfg, "tied_joint": joint}


def init_reference(world: int) -> dict[str, dict[str, torch.Tensor]]:
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
    from deepseek_moe.train.routing import orthogonal_init_experts

    states = {}
    for name, cfg in init_configs(world).items():
        torch.manual_seed(0)
        model = DeepSeekMoEForCausalLM(cfg)
        states[name] = {k: v.clone() for k, v in model.state_dict().items()}
        orthogonal_init_experts(model)
        states[name + "+orthogonal"] = {k: v.clone() for k, v in model.state_dict().items()}
    return states


def hybrid_worker(rank: int, world: int) -> dict[str, Any]:
    """ep=2 on 4 ranks: experts split over 2 ranks, each slice FSDP-sharded over the other 2."""
    step = fsdp_step(rank, world, hybrid_config(), ep=2)
    return {k: step[k] for k in ("loss", "logits", "grads", "norm", "dropped", "sharded", "ep_rank")} | {
        "state": step["state"] if rank == 0 else None}


def all_worker(rank: int, world: int) -> dict[str, Any]:
    """Everything on one spawn per world size (process start-up dominates on 2 cores)."""
    out = {"layer": layer_cases_worker(rank, world), "model": model_worker(rank, world)}
    if world == 4:
        out["hybrid"] = hybrid_worker(rank, world)
    return out


# ---------------------------------------------------------------- failures
def dead_rank_worker(rank: int, world: int) -> dict[str, Any]:
    """The last rank dies after joining; the others must fail on their own, with an error, not hang."""
    from deepseek_moe.parallel import init_parallel, parallelize_experts

    ctx = init_parallel(timeout_s=20)
    cfg = layer_cases(world)["free"]
    moe = parallelize_experts(build_layer(cfg), ctx)
    if rank == world - 1:
        os._exit(3)
    x, _ = layer_data(cfg)
    for _ in range(100):
        moe(x)
    return {}


def main(worker: str) -> None:
    rank_main(globals(), worker)
