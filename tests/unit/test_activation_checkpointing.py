"""Activation checkpointing recomputes each block in the backward: the same loss, gradients and routing side
effects (bias counts, statistics, random draws) as without it."""

from __future__ import annotations

import pytest
import torch

from deepseek_moe.config import ModelConfig, MoEConfig
from deepseek_moe.model.block import set_activation_checkpointing
from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM
from deepseek_moe.moe.all_layers import moe_layers, set_uniform_routing


def model(**moe: object) -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, inter_dim=48, n_layers=3, n_dense_layers=1, n_heads=2, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=16,
                      moe=MoEConfig(dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2,
                                    n_shared_experts=1, n_expert_groups=2, n_limited_groups=1,
                                    expert_loss_alpha=0.01, capacity_factor=0.75, protected_fraction=0.25, **moe))
    return DeepSeekMoEForCausalLM(cfg).train()


def two_steps(m: DeepSeekMoEForCausalLM, uniform: bool) -> dict[str, object]:
    set_uniform_routing(m, uniform)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(2):  # the second forward sees the generator state the first left
        out = m(ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
    moes = [moe for _, moe in moe_layers(m)]
    return {"losses": torch.stack(losses), "grads": {n: p.grad.clone() for n, p in m.named_parameters()
                                                      if p.grad is not None},
            "counts": torch.stack([moe.bias_counts.clone() for moe in moes]),
            "dropped": [int(moe.last_stats.dropped) for moe in moes],
            "next_draw": [torch.rand(1, generator=moe.generator(torch.device("cpu"))) for moe in moes]}


@pytest.mark.parametrize("mode", ["full", "attention"])
@pytest.mark.parametrize("uniform", [False, True], ids=["routed", "uniform_warmup"])
def test_checkpointed_blocks_match_plain_ones(uniform: bool, mode: str) -> None:
    plain = two_steps(model(use_routing_bias=True, score_func="sigmoid"), uniform)
    ckpt_model = model(use_routing_bias=True, score_func="sigmoid")
    set_activation_checkpointing(ckpt_model, True if mode == "full" else mode)  # True: the bool configs said
    assert all(block.activation_checkpointing == mode for block in ckpt_model.layers)
    ckpt = two_steps(ckpt_model, uniform)
    torch.testing.assert_close(ckpt["losses"], plain["losses"], rtol=0, atol=0)
    assert set(ckpt["grads"]) == set(plain["grads"])
    for name, g in plain["grads"].items():
        torch.testing.assert_close(ckpt["grads"][name], g, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(ckpt["counts"], plain["counts"])  # counted once, not again in the recompute
    assert ckpt["dropped"] == plain["dropped"]
    assert ckpt["next_draw"] == plain["next_draw"]  # the recompute replayed the draws, not advanced them
    if not uniform:
        assert plain["counts"].sum() > 0


def test_attention_mode_recomputes_attention_only() -> None:
    """"attention" keeps the FFN's activations (the MoE forward runs once a step) and recomputes the attention
    half: attention's projections run twice, the routed experts once; "full" runs both twice."""
    calls: dict[str, dict[str, int]] = {}
    for mode in ("none", "attention", "full"):
        m = model()
        set_activation_checkpointing(m, mode)
        counts = calls[mode] = {"attn": 0, "experts": 0}
        m.layers[1].attn.wo.register_forward_pre_hook(lambda *_, c=counts: c.__setitem__("attn", c["attn"] + 1))
        m.layers[1].ffn.experts.register_forward_pre_hook(lambda *_, c=counts: c.__setitem__("experts", c["experts"] + 1))
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
        m(ids, labels=ids).loss.backward()
    assert calls == {"none": {"attn": 1, "experts": 1}, "attention": {"attn": 2, "experts": 1},
                     "full": {"attn": 2, "experts": 2}}


@pytest.mark.parametrize("bad", ["attn", "yes", 1.0])
def test_unknown_mode_is_refused_naming_the_field(bad: object) -> None:
    from deepseek_moe.train.config import TrainConfig

    with pytest.raises(ValueError, match="activation_checkpointing"):
        set_activation_checkpointing(model(), bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="activation_checkpointing"):
        TrainConfig(activation_checkpointing=bad)  # type: ignore[arg-type]
