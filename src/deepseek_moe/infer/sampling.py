"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

``probabilities`` is the one transform from logits to the distribution a token is drawn from; ``sample`` draws
from it, and speculative decoding (infer/speculative.py) accepts drafted tokens against it, so both follow the
same distribution.
"""

from __future__ import annotations

import torch


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature ({temperature}) must be >= 0 (0 is greedy)")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k ({top_k}) must be a positive integer or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p ({top_p}) must be in (0, 1] or None")


def probabilities(logits: torch.Tensor, *, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """logits (..., V) -> float32 probabilities (..., V) of sampling at ``temperature`` (> 0) among the top_k
    and top_p candidates; top_p keeps the smallest set of most likely tokens whose mass reaches top_p."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        raise ValueError("temperature 0 is greedy: it has no distribution to draw from (take the argmax)")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 is greedy (argmax); top_k and top_p restrict the
    candidates before drawing (see ``probabilities``)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
