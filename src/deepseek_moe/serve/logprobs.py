"""Log-probabilities of the chosen tokens and of the most likely alternatives, for OpenAI's ``logprobs``.

Which distribution: the model's raw next-token distribution, ``log_softmax`` of the logits the forward produced
(in float32), before temperature, top-k/top-p and structured-output grammar masks, as vLLM's default ("raw
logprobs") reports. So a value does not depend on how the token was sampled, a masked-out token keeps its true
probability (the mask's -inf would otherwise leak in), and greedy's chosen token is the top-1 alternative.

Computed once per step for the rows that asked, batched: one log-softmax, one gather and one top-k over the
(rows, vocabulary) matrix; rows that did not ask are not touched.
"""

from __future__ import annotations

import torch

TokenLogprobs = tuple[float, tuple[tuple[int, float], ...]]


def token_logprobs(logits_NV: torch.Tensor, tokens: list[int], top: list[int]) -> list[TokenLogprobs]:
    """For each row n: (log p(tokens[n]), the top[n] most likely (token, log p), most likely first)."""
    if not tokens:
        return []
    logp = torch.log_softmax(logits_NV.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    k = max(top)
    if k == 0:
        return [(c, ()) for c in chosen]
    values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
    vals, idx = values.tolist(), indices.tolist()
    return [(c, tuple(zip(i[:t], v[:t], strict=True))) for c, i, v, t in zip(chosen, idx, vals, top, strict=True)]
