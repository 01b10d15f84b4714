"""Autoregressive generation over the latent KV cache, for one prompt or a batch of different lengths.

A batch is left-padded: every row's last prompt token sits in the same column, so each decode step feeds one
token per row. The attention mask hides the padding and positions count only real tokens, so a row's result
does not depend on what it is batched with (a test checks batched == one at a time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from deepseek_moe.infer.sampling import sample

if TYPE_CHECKING:
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM


@dataclass
class GenerateOutput:
    """Per row: the new tokens (stop token included) and prompt + new tokens; wall-clock seconds."""

    new_tokens: list[list[int]]
    sequences: list[list[int]]
    prefill_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        n = sum(max(len(t) - 1, 0) for t in self.new_tokens)  # the first new token comes from the prefill
        return n / self.decode_s if self.decode_s > 0 else float("nan")


def _as_prompts(input_ids: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        return [row.tolist() for row in input_ids]
    return [list(map(int, row)) for row in input_ids]


@torch.inference_mode()
def generate(model: DeepSeekMoEForCausalLM, input_ids: torch.Tensor | Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens: Sequence[int] = (), seed: int | None = None,
             stream: Callable[[int, int], None] | None = None, pad_token_id: int = 0) -> GenerateOutput:
    """Continue each prompt (a (B, T) tensor without padding, or a list of token lists of any lengths).

    A row stops after emitting a token in ``stop_tokens``, after ``max_new_tokens``, or when it reaches the
    model's ``max_seq_len``. ``stream(row, token)`` is called as each token is chosen.
    """
    prompts = _as_prompts(input_ids)
    max_seq_len = model.config.max_seq_len
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    for i, p in enumerate(prompts):
        if len(p) > max_seq_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than the model's max_seq_len ({max_seq_len})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 0")

    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    stops = set(stop_tokens)

    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    # A row may not grow past max_seq_len tokens; room is per row, so batching changes nothing.
    limits = [min(max_new_tokens, max_seq_len - len(p)) for p in prompts]
    new_tokens: list[list[int]] = [[] for _ in prompts]
    done = [limit == 0 for limit in limits]

    try:
        cache = model.new_cache()
        start = time.perf_counter()
        logits = model(ids, attention_mask=mask, cache=cache).logits[:, -1]
        prefill_s, decode_start = time.perf_counter() - start, time.perf_counter()
        while not all(done):
            next_ids = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            for i, token in enumerate(next_ids.tolist()):
                if done[i]:
                    continue
                new_tokens[i].append(token)
                if stream is not None:
                    stream(i, token)
                done[i] = token in stops or len(new_tokens[i]) >= limits[i]
            if all(done):
                break
            # Finished rows keep stepping (batched shapes) but their tokens are discarded.
            step_mask = torch.tensor([0 if d else 1 for d in done], dtype=torch.long, device=device)[:, None]
            logits = model(next_ids[:, None], attention_mask=step_mask, cache=cache).logits[:, -1]
        decode_s = time.perf_counter() - decode_start
    finally:
        model.train(was_training)
    return GenerateOutput(new_tokens=new_tokens, sequences=[p + n for p, n in zip(prompts, new_tokens, strict=True)],
                          prefill_s=prefill_s, decode_s=decode_s)
