"""Autoregressive generation over the latent KV cache, for one prompt or a batch of different lengths.

A batch is left-padded: every row's last prompt token sits in the same column, so each decode step feeds one
token per row (the loop, shared with ONNX Runtime generation, is infer/loop.py). The attention mask hides the padding and positions count only real tokens, so a row's result
does not depend on what it is batched with (a test checks batched == one at a time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from deepseek_moe.infer.draft import BatchDrafter, Drafter, SamplingParams, as_batch_drafter
from deepseek_moe.infer.loop import check_prompts, decode, left_padded
from deepseek_moe.infer.sampling import check_sampling, sample
from deepseek_moe.infer.speculative import SpecStats, decode_speculative

if TYPE_CHECKING:
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM


@dataclass
class GenerateOutput:
    """Per row: the new tokens (stop token included) and prompt + new tokens; wall-clock seconds; with a
    drafter, the speculative counts (all rows together)."""

    new_tokens: list[list[int]]
    sequences: list[list[int]]
    prefill_s: float
    decode_s: float
    speculative: SpecStats | None = None

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
             stream: Callable[[int, int], None] | None = None, pad_token_id: int = 0,
             drafter: Drafter | BatchDrafter | None = None, num_draft_tokens: int = 4) -> GenerateOutput:
    """Continue each prompt (a (B, T) tensor without padding, or a list of token lists of any lengths).

    A row stops after emitting a token in ``stop_tokens``, after ``max_new_tokens``, or when it reaches the
    model's ``max_seq_len``. ``stream(row, token)`` is called as each token is chosen.

    With a ``drafter`` (``infer.draft.NgramDrafter``, or ``infer.mtp_draft.MTPDrafter(model)`` for a model with
    MTP modules), decoding is speculative: up to ``num_draft_tokens`` drafted tokens per row and step, verified in
    one forward (``infer.speculative``). Greedy output is the same token for token;
    sampled output follows the same distribution (not the same draws: the random numbers are used differently).
    """
    prompts = _as_prompts(input_ids)
    max_seq_len = model.config.max_seq_len
    check_prompts(prompts, max_seq_len=max_seq_len, max_new_tokens=max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    if drafter is not None and num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens ({num_draft_tokens}) must be >= 1")

    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    padded_ids, padded_mask = left_padded(prompts, pad_token_id)
    ids = torch.tensor(padded_ids, dtype=torch.long, device=device)
    mask = torch.tensor(padded_mask, dtype=torch.long, device=device)
    cache = model.new_cache()

    def choose(logits: torch.Tensor) -> list[int]:
        return sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator).tolist()

    def step(tokens: list[int], done: list[bool]) -> torch.Tensor:
        step_mask = torch.tensor([[0 if d else 1] for d in done], dtype=torch.long, device=device)
        next_ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        return model(next_ids, attention_mask=step_mask, cache=cache).logits[:, -1]

    try:
        start = time.perf_counter()
        out = model(ids, attention_mask=mask, cache=cache)
        logits = out.logits[:, -1]
        batch_drafter = None
        if drafter is not None:
            # The drafter's own work on the prompt (an MTP module's forward over it) is prefill work.
            assert out.hidden is not None
            batch_drafter = as_batch_drafter(drafter)
            batch_drafter.begin(out.hidden, mask, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                                                 generator=generator))
            fill = getattr(batch_drafter, "fill_prompts", None)  # optional (infer/draft.py's BatchDrafter)
            if fill is not None:
                fill(prompts, num_draft_tokens)
        prefill_s, decode_start = time.perf_counter() - start, time.perf_counter()
        stats = None
        if batch_drafter is None:
            new_tokens = decode(logits, prompts, max_new_tokens=max_new_tokens, max_seq_len=max_seq_len,
                                choose=choose, step=step, stop_tokens=stop_tokens, stream=stream)
        else:
            stats = SpecStats()

            def verify(ids: torch.Tensor, step_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                step = model(ids, attention_mask=step_mask, cache=cache)
                assert step.hidden is not None
                return step.logits, step.hidden

            new_tokens = decode_speculative(
                logits, prompts, max_new_tokens=max_new_tokens, max_seq_len=max_seq_len, drafter=batch_drafter,
                num_draft_tokens=num_draft_tokens, forward=verify, discard=cache.discard, temperature=temperature,
                top_k=top_k, top_p=top_p, generator=generator, stop_tokens=stop_tokens, stream=stream, stats=stats)
        decode_s = time.perf_counter() - decode_start
    finally:
        model.train(was_training)
    return GenerateOutput(new_tokens=new_tokens, sequences=[p + n for p, n in zip(prompts, new_tokens, strict=True)],
                          prefill_s=prefill_s, decode_s=decode_s, speculative=stats)
