"""Padding never reaches the router: a left-padded batch routes, counts, drops and balances exactly as its real
tokens do without padding."""

import pytest
import torch

from deepseek_moe import DeepSeekMoEForCausalLM, ModelConfig, MoE, MoEConfig
from deepseek_moe.moe.all_layers import moe_layers

LENGTHS = [6, 4, 1]  # real tokens of each sequence; the batch is left-padded to 6


def _cfg(**changes):
    return MoEConfig(**{**dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2,
                               n_shared_experts=1, n_expert_groups=4, n_limited_groups=2,
                               expert_loss_alpha=0.01, device_loss_alpha=0.02, comm_loss_alpha=0.03,
                               score_func="sigmoid", norm_topk_prob=True, use_routing_bias=True,
                               seq_loss_alpha=0.01, capacity_factor=0.5, protected_fraction=0.0), **changes})


def _padded(real: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(len(r) for r in real)
    x = torch.randn(len(real), S, real[0].shape[-1]) * 10  # loud garbage where the padding is
    mask = torch.zeros(len(real), S, dtype=torch.bool)
    for b, r in enumerate(real):
        x[b, S - len(r):] = r
        mask[b, S - len(r):] = True
    return x, mask


def _layer(cfg):
    torch.manual_seed(0)
    return MoE(cfg, layer_id=1).train()


@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_padded_batch_equals_its_real_tokens(scope):
    # (V3's sequence-wise loss is per sequence in either scope: it is checked with the sequence scope.)
    cfg = _cfg(balance_loss_scope=scope, seq_loss_alpha=0.01 if scope == "sequence" else 0.0)
    real = [torch.randn(n, 16) for n in LENGTHS]
    x, mask = _padded(real)
    padded = _layer(cfg)
    y = padded(x, token_mask=mask)

    # Counts, drops, outputs and the batch-scope losses: the real tokens as one unpadded batch.
    whole = _layer(cfg)
    y_whole = whole(torch.cat(real).unsqueeze(0))
    assert torch.equal(padded.last_stats.tokens_per_expert, whole.last_stats.tokens_per_expert)
    assert torch.equal(padded.bias_counts, whole.bias_counts)
    assert int(padded.last_stats.dropped) == int(whole.last_stats.dropped) > 0
    assert padded.last_stats.n_assignments == sum(LENGTHS) * 2
    torch.testing.assert_close(y[mask], y_whole[0])
    assert torch.count_nonzero(y[~mask]) == 0  # padding is routed nowhere
    if scope == "batch":
        torch.testing.assert_close(padded.aux_loss, whole.aux_loss)
    else:  # sequence scope: the mean of each sequence's losses, each computed on that sequence alone
        alone = []
        for r in real:
            layer = _layer(cfg)
            layer(r.unsqueeze(0))
            alone.append(layer.aux_loss)
        torch.testing.assert_close(padded.aux_loss, torch.stack(alone).mean())


def test_gradients_ignore_padding():
    cfg = _cfg(capacity_factor=None)
    real = [torch.randn(n, 16) for n in LENGTHS]
    x, mask = _padded(real)
    x.requires_grad_()
    layer = _layer(cfg)
    (layer(x, token_mask=mask).square().sum() + layer.aux_loss).backward()
    assert torch.count_nonzero(x.grad[~mask]) == 0


def test_model_passes_the_attention_mask_to_the_routers():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=16, inter_dim=32, n_layers=3, n_dense_layers=1, n_heads=2,
                      kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=16,
                      moe=_cfg(capacity_factor=None))
    model = DeepSeekMoEForCausalLM(cfg).train()
    real = [torch.randint(0, 64, (n,)) for n in LENGTHS]
    S = max(LENGTHS)
    ids = torch.zeros(len(real), S, dtype=torch.long)
    mask = torch.zeros(len(real), S, dtype=torch.long)
    for b, r in enumerate(real):
        ids[b, S - len(r):], mask[b, S - len(r):] = r, 1
    out = model(ids, attention_mask=mask, labels=ids)
    counts = [moe.last_stats.tokens_per_expert.clone() for _, moe in moe_layers(model)]

    alone_aux, alone_counts = [], [torch.zeros_like(c) for c in counts]
    for r in real:
        one = model(r.unsqueeze(0), labels=r.unsqueeze(0))
        alone_aux.append(one.aux_loss)
        for total, (_, moe) in zip(alone_counts, moe_layers(model), strict=True):
            total += moe.last_stats.tokens_per_expert
    for got, want in zip(counts, alone_counts, strict=True):
        assert torch.equal(got, want)
    torch.testing.assert_close(out.aux_loss, torch.stack(alone_aux).mean(), rtol=1e-5, atol=1e-7)
