"""A served model whose MTP modules draft often but not always right, for the scheduler's MTP-speculative tests.

One MoE layer; each MTP module's block is a noisy copy of it, fed the next token's embedding (eh_proj passes the
embedding half through, plus a little of the hidden state; embeddings of unit RMS, so enorm changes nothing): the
module then sees about what the main model sees one token later (tests/unit/test_speculative_mtp.py's echo model, on the serving fixture's config)."""

from __future__ import annotations

import dataclasses

import torch
from serve_fixtures import tiny_config

from deepseek_moe import DeepSeekMoEForCausalLM


def echo_mtp_model(depth: int, noise: float = 2.0, hidden_weight: float = 0.5, vocab_size: int = 512,
                   seed: int = 0,
                   dtype: torch.dtype = torch.float64) -> DeepSeekMoEForCausalLM:
    cfg = dataclasses.replace(tiny_config(vocab_size), mtp_depth=depth, n_layers=1, n_dense_layers=0)
    model = DeepSeekMoEForCausalLM(cfg, init_seed=seed).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    dim = cfg.dim
    with torch.no_grad():
        model.head.weight.mul_(10.0)  # sharper logits: greedy choices far from float ties
        e = model.embed.weight
        e /= e.pow(2).mean(-1, keepdim=True).sqrt()
        for module in model.mtp:
            module.block.load_state_dict(model.layers[0].state_dict())
            module.norm.load_state_dict(model.norm.state_dict())
            module.eh_proj.weight.zero_()
            module.eh_proj.weight[:, :dim] = torch.eye(dim)
            # and some of the hidden state, so that a wrong h^{j-1} changes the drafts
            module.eh_proj.weight[:, dim:] = hidden_weight * torch.randn(dim, dim, generator=g,
                                                                         dtype=torch.float64).to(dtype) / dim**0.5
            for p in module.block.parameters():
                p.add_(noise * p.std() * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    return model
