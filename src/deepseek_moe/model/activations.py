"""Activation memory of a training micro-batch: the bytes autograd keeps for the backward, per token.

Read off what our modules save, and checked against ``torch.autograd.graph.saved_tensors_hooks`` in
tests/unit/test_memory.py. ``c`` is the compute dtype's size in bytes; 4 marks what our code keeps in fp32 whatever
the compute dtype. D dim, H heads, Q = N + R query/key head dim (nope + rope), V value head dim, E routed experts,
K activated, F expert width, Fs = n_shared * F, I dense FFN width, W vocabulary:

    RMSNorm(d)   d * (4 + 2c) + 4  its fp32 copy of the input, the normalised value cast back (the weight's
                               gradient needs it), its output (the next projection's input), 1/rms (fp32)
    MLA          attention norm + q norm(q_lora_rank) if any + kv norm(kv_lora_rank)
                 + H * (2Q + (N + V) + V) * c + 4H: SDPA keeps q and k (H*Q each), v as a view of wkv_b's output
                 (H*(N+V)), its output (H*V; wo's input is a view of it) and its log-sum-exp (H, fp32)
    MHA          attention norm + H * (2Q + 2V) * c + 4H (v is wv's own output)
    dense FFN    FFN norm + 4 * I * c: w1's output (SiLU's input), SiLU's output, w3's output, their product
    MoE          FFN norm + router: fp32 copy of its input (4D, none when c == 4), the scores and the balance
                 loss's copy (2 * 4E)
                 + K * (D + 5F + 1) * c + 3 * 8K: per expert row its input, w1's, SiLU's and w3's outputs, their
                 product, the gated product, the gate, and three int64 indices (the sum back into tokens keeps
                 only its indices, not the rows' outputs: moe/dispatch.py)
                 + 4 * Fs * c (the shared experts, as a dense FFN)
    head         final norm + 4W + 4 + 1 + 2 * 8: the fp32 logits (the loss keeps them, and no log-softmax copy:
                 nn/cross_entropy.py), each row's log-sum-exp (fp32) and whether its target counts (bool), the
                 token ids and the targets (int64)

Expert rows assume balanced routing: under expert parallelism a rank runs, on average, as many (token, expert)
rows as its own tokens make (K per token); an imbalanced step runs more. With activation checkpointing per block
the backward keeps only each block's input (D * c per token per block), recomputes one block at a time (the
largest block's activations at once) and keeps the head's. Not counted: the activation gradients in flight
during the backward (a few D-sized rows per token) and cos/sin/masks (shared by all layers).
"""

from __future__ import annotations

from deepseek_moe.config import ModelConfig

FP32 = 4
INDEX = 8  # int64


def norm_bytes(d: int, c: int) -> int:
    return d * (FP32 + 2 * c) + FP32


def attention_bytes(cfg: ModelConfig, c: int, *, sdpa_pads_v: bool = False) -> int:
    """Per token, the attention norm included. SDPA's fused kernels return their output in (B, T, H, V) memory
    order, so wo's input is a view of it. ``sdpa_pads_v``: MLA on CPU pads v to the query head dim for SDPA's
    fused kernel, so SDPA keeps the padded v and output (H*Q each), and wo a sliced, contiguous copy (H*V)."""
    H, Q, N, V = cfg.n_heads, cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    total = norm_bytes(cfg.dim, c) + FP32 * H
    if cfg.attention == "mha":
        return total + H * (2 * Q + 2 * V) * c
    total += norm_bytes(cfg.kv_lora_rank, c) + (norm_bytes(cfg.q_lora_rank, c) if cfg.q_lora_rank else 0)
    v_out_wo = 2 * H * Q + H * V if sdpa_pads_v else H * (N + V) + H * V
    return total + (2 * H * Q + v_out_wo) * c


def ffn_bytes(cfg: ModelConfig, layer_id: int, c: int) -> int:
    """Per token, the FFN norm included: a dense SwiGLU for the first n_dense_layers, the MoE layer after."""
    total = norm_bytes(cfg.dim, c)
    if layer_id < cfg.n_dense_layers:
        return total + 4 * cfg.inter_dim * c
    moe = cfg.moe
    router = (FP32 * cfg.dim if c != FP32 else 0) + 2 * FP32 * moe.n_routed_experts
    K, F = moe.n_activated_experts, moe.moe_inter_dim
    routed = K * (cfg.dim + 5 * F + 1) * c + 3 * K * INDEX
    return total + router + routed + 4 * moe.n_shared_experts * F * c


def block_bytes(cfg: ModelConfig, layer_id: int, c: int, *, sdpa_pads_v: bool = False) -> int:
    """Per token, one block."""
    return attention_bytes(cfg, c, sdpa_pads_v=sdpa_pads_v) + ffn_bytes(cfg, layer_id, c)


def head_bytes(cfg: ModelConfig, c: int) -> int:
    """Per token, the final norm, the head and the loss."""
    return norm_bytes(cfg.dim, c) + FP32 * cfg.vocab_size + FP32 + 1 + 2 * INDEX


def activation_bytes(cfg: ModelConfig, *, tokens: int, compute: int, checkpointing: bool,
                     sdpa_pads_v: bool = False) -> int:
    """Saved activations of a micro-batch of ``tokens`` tokens (batch * seq_len) at the start of the backward,
    with ``compute``-byte activations, with or without activation checkpointing per block."""
    blocks = [block_bytes(cfg, i, compute, sdpa_pads_v=sdpa_pads_v) for i in range(cfg.n_layers)]
    if checkpointing:
        per_token = cfg.n_layers * cfg.dim * compute + max(blocks)
    else:
        per_token = sum(blocks)
    return tokens * (per_token + head_bytes(cfg, compute))


__all__ = ["activation_bytes", "attention_bytes", "block_bytes", "ffn_bytes", "head_bytes", "norm_bytes"]
