"""Speculative decoding: a drafter guesses k tokens, one forward of the model over them verifies all k, and
standard speculative rejection sampling (Leviathan et al. 2023, Chen et al. 2023) decides how many to keep, so
that what is emitted follows the model's own distribution exactly.

With p the model's distribution at a position (temperature, top-k and top-p applied: ``infer.sampling.
probabilities``, the transform plain sampling draws from) and q the drafter's, drafted token x is accepted with
probability min(1, p(x)/q(x)); at the first rejection the token is drawn from norm(max(0, p - q)) and the rest of
the draft is dropped; when all k are accepted, the forward's last position gives one more token from p. Each
emitted token is then distributed as p given the tokens before it. Greedy (temperature 0) accepts a drafted token
iff it is the argmax, so the output is the plain greedy output token for token.

``accept`` is that rule for one row. ``decode_speculative`` is the generation loop over a dense KVCache (used by
``infer.generate``): the rejected draft slots are discarded from the cache (``KVCache.discard``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from deepseek_moe.infer.draft import BatchDrafter, Draft
from deepseek_moe.infer.sampling import probabilities


@dataclass
class SpecStats:
    """Counts of a speculative run: ``steps`` drafts verified (per row: a step where it drafted nothing is a plain
    decode step and not counted), ``drafted`` tokens proposed, ``accepted`` of them kept. The scheduler counts
    the same way."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    def add(self, drafted: int, accepted: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification forward: the accepted drafts plus the one the forward always adds."""
        return (self.accepted + self.steps) / self.steps if self.steps else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {"steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "mean_acceptance_length": self.mean_acceptance_length}


def accept(logits: torch.Tensor, draft: Draft, *, temperature: float, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> list[int]:
    """The tokens to emit after verifying ``draft`` (k tokens) against ``logits`` (k + 1, V): row j is the
    model's next-token logits after the context and the first j drafted tokens. Returns the accepted prefix of the
    draft plus one token (the correction drawn at the first rejection, or the bonus from the last row), so
    between 1 and k + 1 tokens."""
    k = len(draft.tokens)
    if logits.dim() != 2 or logits.shape[0] != k + 1:
        raise ValueError(f"verification logits of shape {tuple(logits.shape)} for a draft of {k} tokens: "
                         f"expected ({k + 1}, vocab)")
    if temperature == 0.0:
        target = logits.argmax(dim=-1).tolist()
        out = []
        for j, x in enumerate(draft.tokens):
            if x != target[j]:
                break
            out.append(x)
        return out + [target[len(out)]]
    p = probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p)  # (k + 1, V)
    q = draft.q
    out = []
    for j, x in enumerate(draft.tokens):
        p_x = float(p[j, x])
        q_x = 1.0 if q is None else float(q[j, x])
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * q_x < p_x:  # u < p(x)/q(x), without dividing by a q(x) of 0
            out.append(x)
            continue
        if q is None:  # max(0, p - onehot(x)) is p with x removed
            residual = p[j].clone()
            residual[x] = 0.0
        else:
            residual = (p[j] - q[j].to(p.device, torch.float32)).clamp(min=0.0)
        if float(residual.sum()) <= 0.0:  # only when p == q up to rounding, where rejection has probability ~0
            residual = p[j]
        return out + [int(torch.multinomial(residual, 1, generator=generator))]
    return out + [int(torch.multinomial(p[k], 1, generator=generator))]


@dataclass
class _Row:
    context: list[int]  # prompt + emitted tokens
    limit: int  # the most new tokens this row may emit
    new: list[int] = field(default_factory=list)
    done: bool = False


def _capped(d: Draft, k: int) -> Draft:
    if len(d.tokens) <= k:
        return d
    return Draft(d.tokens[:k], None if d.q is None else d.q[:k])  # a drafter that ignored k


def decode_speculative(first: torch.Tensor, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                       max_seq_len: int, drafter: BatchDrafter, num_draft_tokens: int,
                       forward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                       discard: Callable[[torch.Tensor], None], temperature: float, top_k: int | None,
                       top_p: float | None, generator: torch.Generator | None, stop_tokens: Sequence[int] = (),
                       stream: Callable[[int, int], None] | None = None,
                       stats: SpecStats | None = None) -> list[list[int]]:
    """Each row's new tokens from ``first`` (the prefill's last logits, (B, V)) on: the rules of
    ``infer.loop.decode`` (per-row room, stop tokens, streaming), a draft of up to ``num_draft_tokens`` per row
    and step.

    Each step feeds, per row, the last emitted token and its draft, right-aligned in (B, T = 1 + longest
    draft) and left-padded (mask 0): ``forward(ids, mask)`` returns logits (B, T, V) and the main model's hidden
    states (B, T, dim) and caches the T slots; ``discard(rejected)`` (B, T) bool then drops the slots of the
    rejected drafts from the cache. ``drafter``: begun on the prefill (``BatchDrafter.begin``, which
    ``as_batch_drafter`` gives a plain ``Drafter``) with the sampling parameters given here.
    """
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens ({num_draft_tokens}) must be >= 1")
    stats = stats if stats is not None else SpecStats()
    stops = set(stop_tokens)
    rows = [_Row(list(p), min(max_new_tokens, max_seq_len - len(p))) for p in prompts]

    def emit(i: int, tokens: list[int]) -> None:
        row = rows[i]
        for token in tokens:
            row.new.append(token)
            row.context.append(token)
            if stream is not None:
                stream(i, token)
            if token in stops or len(row.new) >= row.limit:
                row.done = True
                return

    for row in rows:
        row.done = row.limit <= 0
    first_tokens = [0] * len(rows)
    if not all(r.done for r in rows):
        if temperature == 0.0:
            first_tokens = first.argmax(dim=-1).tolist()
        else:
            probs = probabilities(first, temperature=temperature, top_k=top_k, top_p=top_p)
            first_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1).tolist()
    for i, row in enumerate(rows):
        if not row.done:
            emit(i, [first_tokens[i]])
    device = first.device
    while not all(r.done for r in rows):
        # A draft never runs past the row's room: the step's own token is always emitted, so at most
        # limit - emitted - 1 drafted tokens can be.
        ks = [0 if r.done else max(0, min(num_draft_tokens, r.limit - len(r.new) - 1)) for r in rows]
        drafts = [_capped(d, k) for d, k in
                  zip(drafter.propose_batch([r.context for r in rows], ks), ks, strict=True)]
        T = 1 + max(len(d.tokens) for d in drafts)
        # The step's ids and mask as Python lists, one tensor each: per-row writes into a tensor cost a few
        # dispatches per row, which at batch 1 is a visible part of a step.
        fed = [[row.context[-1]] + d.tokens for row, d in zip(rows, drafts, strict=True)]
        ids = torch.tensor([[0] * (T - len(f)) + f for f in fed], dtype=torch.long, device=device)
        real = [[0] * (T - len(f)) + [0 if row.done else 1] * len(f) for row, f in zip(rows, fed, strict=True)]
        logits, hidden = forward(ids, torch.tensor(real, dtype=torch.long, device=device))  # (B, T, V), (B, T, dim)
        n_rejected = [0] * len(rows)
        for i, (row, d) in enumerate(zip(rows, drafts, strict=True)):
            if row.done:
                continue
            k = len(d.tokens)
            tokens = accept(logits[i, T - 1 - k:], d, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator)
            n_accepted = len(tokens) - 1
            if k:  # a row with nothing drafted took a plain decode step: no verification to count
                stats.add(k, n_accepted)
            n_rejected[i] = k - n_accepted
            emit(i, tokens)
        for i, n in enumerate(n_rejected):  # the kept slots: the fed token and the accepted drafts
            if n:
                real[i][T - n:] = [0] * n
        if any(n_rejected):
            rejected = torch.zeros(len(rows), T, dtype=torch.bool)
            for i, n in enumerate(n_rejected):
                rejected[i, T - n:] = n > 0
            discard(rejected.to(device))
        drafter.observe(hidden, torch.tensor(real, dtype=torch.bool, device=device))
    return [r.new for r in rows]


__all__ = ["SpecStats", "accept", "decode_speculative"]
