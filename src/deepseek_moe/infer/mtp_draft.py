"""Drafting with the model's own multi-token-prediction modules (DeepSeek-V3 §2.2, §5.4.3: "MTP ... for
speculative decoding").

Notation: a row's context is t_0 .. t_{n-1} (t_{n-1} the last emitted token, not yet fed); the main cache holds
positions 0 .. n-2, h_i the main model's hidden state at i (after its final norm). MTP depth j at position i takes
h_i^{j-1} (h^0 = h) and Emb(t_{i+j}) and predicts t_{i+j+1} (model/mtp.py). So for the next verification, which
feeds t_{n-1} and the draft d_1 .. d_k (d_m guessing t_{n-2+m+1}):

* draft d_j, j <= D, is depth j at position n-2 (V3's sequential chain): h^{j-1}_{n-2} and Emb(d_{j-1})
  (Emb(t_{n-1}) for j = 1) -> logits of t_{n-1+j};
* draft d_j, j > D (more drafts than modules), reuses module D one position further on, its own last output
  standing in for the hidden state it would take (EAGLE's chaining, and vLLM's reuse of DeepSeek's MTP layer
  when num_speculative_tokens exceeds the MTP layers; for D = 1 exactly vLLM's). V3 defines no such step, and
  its drafts are weaker than the first D.

Caches. Each depth has its own KVCache (``model.new_mtp_caches``), filled like the main one: depth j's slot at
position i is *verified* once t_{i+j} and h^{j-1}_i are (i <= n-1-j), and a depth's cache holds exactly its
verified slots between steps. ``fill_prompts`` (called by ``generate`` in the prefill) runs depth j over the
prompt positions 0 .. P-1-j. Every step runs depth j over the positions from its cache's end to n-2 (at the
first step the last j; afterwards the positions the last verification kept, plus j-1 before them), so the draft
at n-2 attends to every earlier position as in training; its last j-1 slots (and depth D's chained ones) used
drafted tokens, and are discarded after drafting (``KVCache.discard``, the main cache's
rollback). Depth 1 therefore always holds as many slots as the main cache (a test checks it); depth j, j-1 fewer.
Hidden states a depth computed at verified positions wait in ``_pending`` until the next depth has consumed
them.

Draws: at temperature 0 each draft is its logits' argmax (q unused: greedy acceptance compares with the argmax);
otherwise it is sampled from ``infer.sampling.probabilities`` of its logits at the request's temperature, top-k
and top-p, and that distribution is the draft's q, so rejection sampling keeps the output exactly the target's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from deepseek_moe.infer.draft import Draft, SamplingParams
from deepseek_moe.infer.sampling import probabilities
from deepseek_moe.model.kv_cache import KVCache

if TYPE_CHECKING:
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM


class MTPDrafter:
    """A ``BatchDrafter`` (infer/draft.py) drafting with ``model``'s MTP modules. One instance serves one
    generation at a time (``begin`` resets it)."""

    def __init__(self, model: DeepSeekMoEForCausalLM) -> None:
        if len(model.mtp) == 0:
            raise ValueError("MTP drafting needs a model with MTP modules, and this model's config has mtp_depth 0: "
                             "train with model.mtp_depth >= 1, load a checkpoint that has them (from_pretrained "
                             "without mtp=False), or draft with NgramDrafter")
        self.model = model
        self.depth = len(model.mtp)
        self.caches: list[KVCache] = []
        # _pending[j][b]: row b's verified h^j (h^0: the main model's) at the positions depth j + 1 has not cached
        # yet, from its cache's end on, (count, dim).
        self._pending: list[list[torch.Tensor]] = []
        self.sampling = SamplingParams(temperature=0.0)

    def begin(self, hidden: torch.Tensor, mask: torch.Tensor, sampling: SamplingParams) -> None:
        B, _, dim = hidden.shape
        self.caches = self.model.new_mtp_caches()
        real = mask.to(torch.bool)
        empty = hidden.new_zeros(0, dim)
        self._pending = [[hidden[b, real[b]] for b in range(B)]] + [[empty] * B for _ in range(self.depth - 1)]
        self.sampling = sampling

    def fill_prompts(self, prompts: Sequence[Sequence[int]], num_draft_tokens: int) -> None:
        """After ``begin``: each depth a generation of ``num_draft_tokens`` drafts uses (1 .. min(D, k)) over the
        prompt positions whose inputs the prompt alone gives: depth j at i <= P-1-j (P the row's prompt length)
        takes t_{i+j}, a prompt token, and h^{j-1}_i, which the prefill or depth j-1 just computed. These are
        verified slots, kept; the first draft then runs each depth over its last j positions only. Without this
        the first draft does the same work (a prompt-length forward of every depth), counted as decoding."""
        held0 = self._pending[0] if self._pending else []
        if len(prompts) != len(held0):
            raise ValueError(f"fill_prompts: {len(prompts)} prompts for a prefill of {len(held0)} rows (call "
                             "begin with the prefill first)")
        for b, (p, h) in enumerate(zip(prompts, held0, strict=True)):
            if len(p) != h.shape[0]:
                raise ValueError(f"fill_prompts: prompt {b} has {len(p)} tokens, its prefill {h.shape[0]} real "
                                 "positions")
        for j in range(1, min(self.depth, num_draft_tokens) + 1):
            counts = [max(0, len(p) - j) for p in prompts]  # positions 0 .. P-1-j; the pending ones start at 0
            if not any(counts):
                return
            held = self._pending[j - 1]
            outputs, _, _ = self._run(j, [h[:c] for h, c in zip(held, counts, strict=True)],
                                      [list(p[j:j + c]) for p, c in zip(prompts, counts, strict=True)],
                                      logits=False)
            for b, c in enumerate(counts):
                held[b] = held[b][c:]
                if j < self.depth:
                    self._pending[j][b] = outputs[b]

    def observe(self, hidden: torch.Tensor, kept: torch.Tensor) -> None:
        # The kept slots of a row are its fed token and accepted drafts, one run of columns: a slice of hidden,
        # found in Python from one copy of the mask rather than by boolean indexing (a nonzero and a gather per
        # row and step, which at batch 1 cost as much as the rest of this method).
        for b, row in enumerate(kept.tolist()):
            cols = [t for t, k in enumerate(row) if k]
            if not cols:
                continue
            if cols[-1] - cols[0] + 1 == len(cols):
                new = hidden[b, cols[0]:cols[-1] + 1]
            else:
                new = hidden[b, torch.tensor(cols, device=hidden.device)]
            held = self._pending[0][b]
            self._pending[0][b] = new if held.shape[0] == 0 else torch.cat((held, new))

    def cache_lengths(self) -> list[list[int]]:
        """Per depth, per row: the slots its cache holds (real tokens, not padding)."""
        return [[0] * len(self._pending[0]) if c.mask is None else c.mask.sum(dim=1).tolist() for c in self.caches]

    def _choose(self, logits: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """logits (B, V) -> a draft token per row and the distribution (B, V) it was drawn from (None: argmax)."""
        s = self.sampling
        if s.temperature == 0.0:
            return logits.argmax(dim=-1).tolist(), None
        q = probabilities(logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        return torch.multinomial(q, 1, generator=s.generator).squeeze(-1).tolist(), q

    def _run(self, depth: int, hidden: list[torch.Tensor], tokens: list[list[int]], *, logits: bool = True
             ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        """Module ``depth`` over each row's positions (``hidden[b]`` (c_b, dim), ``tokens[b]`` c_b ids, c_b >= 0),
        right-aligned and left-padded into one forward over its cache. Returns each row's outputs h^depth
        (c_b, dim), the last column's logits (B, V) (B, 0 without ``logits``: the head is not run) and the columns
        appended to the cache."""
        B, W = len(hidden), max(len(t) for t in tokens)
        dim = self.model.config.dim
        ref = self._pending[0][0]
        mask: torch.Tensor | None = None
        if all(len(t) == W for t in tokens):  # no padding (batch 1, or rows alike): no copies, no mask
            h = hidden[0][None] if B == 1 else torch.stack(hidden)
            ids = torch.tensor(tokens, dtype=torch.long, device=ref.device)
        else:
            h = ref.new_zeros(B, W, dim)
            ids = torch.zeros(B, W, dtype=torch.long, device=ref.device)
            mask = torch.zeros(B, W, dtype=torch.long, device=ref.device)
            for b, (hb, tb) in enumerate(zip(hidden, tokens, strict=True)):
                c = len(tb)
                if c:
                    h[b, W - c:] = hb
                    ids[b, W - c:] = torch.tensor(tb, device=ref.device)
                    mask[b, W - c:] = 1
        out = self.model.mtp_forward(depth, h, ids, attention_mask=mask, cache=self.caches[depth - 1],
                                     last_logits_only=logits, hidden_only=not logits)
        last = out.logits[:, -1] if logits else out.logits.new_empty(B, 0)
        return [out.hidden[b, W - len(tb):] for b, tb in enumerate(tokens)], last, W

    def propose_batch(self, contexts: Sequence[Sequence[int]], ks: Sequence[int]) -> list[Draft]:
        B, D = len(contexts), self.depth
        device = self._pending[0][0].device
        drafts: list[list[int]] = [[] for _ in range(B)]
        qs: list[list[torch.Tensor]] = [[] for _ in range(B)]
        # This step's h^{j-1} at the positions past depth j-1's verified ones (they took drafted tokens), and each
        # row's latest output (1, dim), which a chained step takes.
        empty = self._pending[0][0][:0]
        spec_tail: list[torch.Tensor] = [empty] * B
        last: list[torch.Tensor] = list(spec_tail)
        # Per depth, per forward: its width and, per row, how many of its last slots took drafted tokens and are
        # discarded after drafting (kept as numbers: a mask tensor is built only where something is dropped).
        rejected: list[list[tuple[int, list[int]]]] = [[] for _ in range(D)]
        for j in range(1, max(ks, default=0) + 1):
            active = [b for b in range(B) if ks[b] >= j]
            m = min(j, D)
            hidden = [empty] * B
            tokens: list[list[int]] = [[] for _ in range(B)]
            for b in active:
                ctx, n = contexts[b], len(contexts[b])
                if j <= D:  # depth j over its positions L_j .. n-2, which take t_{L_j+j} .. t_{n-2+j}
                    held, tail = self._pending[j - 1][b], spec_tail[b]
                    hidden[b] = held if tail.shape[0] == 0 else torch.cat((held, tail))
                    start = n - 1 - hidden[b].shape[0]  # L_j
                    tokens[b] = [ctx[i + j] if i + j < n else drafts[b][i + j - n] for i in range(start, n - 1)]
                else:  # chained: module D one position further, on its last output and the last draft
                    hidden[b], tokens[b] = last[b], [drafts[b][-1]]
            outputs, logits, width = self._run(m, hidden, tokens)
            drop = [0] * B
            chosen, q = self._choose(logits if len(active) == B else logits[active])
            for a, b in enumerate(active):
                out = outputs[b]
                last[b] = out[-1:]
                if j <= D:
                    n_verified = max(0, out.shape[0] - (j - 1))  # positions i <= n-1-j: all but the last j-1
                    drop[b] = out.shape[0] - n_verified
                    self._pending[j - 1][b] = self._pending[j - 1][b][n_verified:]
                    if j < D:  # the next depth's inputs: verified ones kept, the rest for this step only
                        self._pending[j][b] = torch.cat((self._pending[j][b], out[:n_verified]))
                    spec_tail[b] = out[n_verified:]
                else:
                    drop[b] = width
                drafts[b].append(chosen[a])
                if q is not None:
                    qs[b].append(q[a])
            rejected[m - 1].append((width, drop))
        # Roll every depth back to its verified slots, as the main cache is after a rejection.
        for d in range(D):
            if any(any(drop) for _, drop in rejected[d]):
                total = sum(width for width, _ in rejected[d])
                mask = torch.zeros(B, total, dtype=torch.bool)
                offset = 0
                for width, drop in rejected[d]:
                    offset += width
                    for b, n_drop in enumerate(drop):
                        if n_drop:
                            mask[b, offset - n_drop:offset] = True
                self.caches[d].discard(mask.to(device))
        return [Draft(drafts[b], torch.stack(qs[b]) if qs[b] else None) for b in range(B)]


__all__ = ["MTPDrafter"]
