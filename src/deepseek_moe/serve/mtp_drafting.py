"""Drafting with the model's MTP modules in the scheduler (``SchedulerConfig.speculative="mtp"``): the paged
counterpart of ``infer/mtp_draft.py``'s MTPDrafter, whose notation this follows (DeepSeek-V3 §2.2: depth j at
position i takes h^{j-1}_i and Emb(t_{i+j}) and predicts t_{i+j+1}; h^0 is the main model's last hidden state).

Where the MTP keys and values live. Depth j's entry for position i is stored at *index* i + j, the index of the
token it reads (and the position its RoPE uses, as in ``mtp_forward``), in pool layer ``n_layers + j - 1`` of the
request's own block table: the depths are layers of the scheduler's one ``BlockPool``. An entry at index k then
depends on tokens 0..k only, exactly like the main latents at k, so everything the pool does to a table carries
over unchanged: a rollback (``truncate``) forgets the MTP entries of rejected slots with the main ones, a fork
shares the full blocks and copies the partly filled one for the MTP layers too, preemption and finishing free
them, and a block registered in the prefix cache holds MTP entries as final as its latents (same content key).
Depth j has no entry at indices < j (no h^{j-1} before position 0): those slots hold finite values of a zero
hidden state and are masked out of every query (``_DepthCache``), so depth j's cache starts at t_j as in
training and in MTPDrafter.

Invariant between steps: every depth caches exactly the indices the main cache does (from j on), except the c
slots the row's last verification kept, whose main hidden states wait on the request (``Request.mtp_pending``).
``fill`` runs depth 1..D over a prefill chunk's new indices right after its main forward, each depth fed the
previous one's outputs one index back; a verification's kept slots go through the depths with the row's next
drafting, in the same forwards as its drafts (so a step costs one MTP forward per drafted token, as in
MTPDrafter), or alone if it drafts nothing. Blocks are registered for sharing only once their MTP entries are
written (a request's last verification leaves its last blocks unregistered).

What crosses a step boundary besides the cache is h^{j-1} at the last cached index (the input of the next index's
depth j), kept on the request (``Request.mtp_last``). After a prefix-cache match the request has not computed its
last matched slot, so every block's last slot also leaves its h^0..h^{D-1} in a per-block stash (D x dim per
block, beside the cache), written by the fill that completes the block, before it can be registered: a request
resuming at a block boundary reads it there. So a prefix-cache hit, or a preempted request that finds its own
blocks again, drafts at once with the same MTP state as if it had computed the prefix itself.

Drafting (``draft``), for a decoding row whose table holds indices 0..L-1 (t_L = its last token, not yet fed),
the MTP entries all but its c pending ones: draft d_j, j <= D, is depth j over indices L-c .. L+j-1 (the pending
tokens, t_L, d_1 .. d_{j-1}; the first input from ``mtp_last``, the others the previous depth's outputs of this
drafting, the pending main hidden states for depth 1); d_j, j > D, runs depth D one index
further on its own last output (MTPDrafter's chaining). Those entries are written at indices >= L, into blocks
reserved for the verification and owned by the row alone (a shared block is always full and below L); the
verification's ``fill`` overwrites the kept ones, and truncation forgets the rest. Draws are MTPDrafter's: the
argmax at temperature 0, otherwise a sample from the row's own transform (``infer.sampling.probabilities``) with
its generator, which is the draft's q for rejection sampling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from deepseek_moe.infer.draft import Draft
from deepseek_moe.infer.sampling import probabilities
from deepseek_moe.model.kv_cache import BlockPool, BlockTable, KVCache, PagedKVCache, plan_gathers
from deepseek_moe.serve.request import Request, SchedulerInvariantError

if TYPE_CHECKING:
    from deepseek_moe.model.causal_lm import DeepSeekMoEForCausalLM


def check_mtp(model: nn.Module) -> int:
    """The model's MTP depth D, or a ValueError naming mtp_depth and --speculative when it has none."""
    depth = len(getattr(model, "mtp", ()))
    if depth == 0:
        raise ValueError("speculative='mtp' (serve --speculative mtp) drafts with the model's multi-token-"
                         "prediction modules, and this model has mtp_depth 0: serve a checkpoint trained with "
                         "model.mtp_depth >= 1 (or a DeepSeek-V3 checkpoint with its MTP layer), or draft with "
                         "speculative='ngram'")
    return depth


class _DepthCache(KVCache):
    """One MTP depth's view of a paged step: its pool layer, and the step's key mask without the indices below
    ``depth`` (which hold no entry of this depth)."""

    def __init__(self, step: PagedKVCache, layer: int, depth: int) -> None:
        super().__init__(0)
        self.step, self.depth = step, depth
        self.layers = [step.layers[layer]]

    def extend_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        real = self.step.extend_mask(new_mask)  # (B, S); checks new_mask is the step's
        index = real.long().cumsum(dim=1) - 1  # each real slot's index in its own sequence
        self.mask = real & (index >= self.depth)
        return self.mask


class PagedMTP:
    """The MTP depths of ``model`` over ``pool``, whose layers ``n_layers .. n_layers + D - 1`` they use (the
    scheduler builds the pool with them). ``models``: adapter name -> the model a request of that adapter runs
    (their MTP modules are used the same way as the main layers)."""

    def __init__(self, model: DeepSeekMoEForCausalLM, pool: BlockPool, models: Mapping[str | None, nn.Module]
                 ) -> None:
        self.depth = check_mtp(model)
        self.base = len(model.layers)
        if pool.n_layers != self.base + self.depth:
            raise ValueError(f"the pool has {pool.n_layers} layers; MTP drafting needs the model's {self.base} and "
                             f"one per MTP depth ({self.depth})")
        self.pool, self.models = pool, models
        self.stash: torch.Tensor | None = None  # (n_blocks, D, dim): each block's last slot's h^0 .. h^{D-1}

    # --- the inputs a new index takes ---------------------------------------------------------------------------

    def _before(self, req: Request, start: int, like: torch.Tensor | None) -> torch.Tensor:
        """(D, dim): h^0 .. h^{D-1} at index ``start - 1``, which depths 1..D take at index ``start`` (zeros, of
        ``like``'s dim and dtype, at index 0: depth j's entries below index j are masked)."""
        if start == 0 and like is not None:
            return like.new_zeros(self.depth, like.shape[-1])
        if req.mtp_last is not None and req.mtp_last[0] == start - 1:
            return req.mtp_last[1]
        bs = self.pool.block_size
        if start % bs == 0 and self.stash is not None:  # resuming after a prefix-cache match
            return self.stash[req.table.blocks[start // bs - 1]]
        raise SchedulerInvariantError(f"request {req.id}: no MTP hidden state for index {start - 1} (it holds "
                                      f"{None if req.mtp_last is None else req.mtp_last[0]})")

    def _run(self, adapter: str | None, depth: int, reqs: Sequence[Request], starts: Sequence[int],
             hidden: Sequence[torch.Tensor], tokens: Sequence[Sequence[int]], logits: bool = True
             ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Depth ``depth`` appending indices ``starts[b] ..`` (``tokens[b]``, inputs ``hidden[b]`` (c_b, dim)) to
        each row's table, right-aligned in one forward. Returns each row's outputs (c_b, dim) and the last
        column's logits (B, V) (with ``logits`` False, (B, 0, V): a fill needs none)."""
        tables = []
        for req, s in zip(reqs, starts, strict=True):
            view = BlockTable()
            view.blocks, view.length = req.table.blocks, s
            tables.append(view)
        n_new = [len(t) for t in tokens]
        step = self.pool.batch(tables, n_new)
        B, T = len(reqs), max(n_new)
        ref = hidden[0]
        h = ref.new_zeros(B, T, ref.shape[-1])
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, (hb, tb) in enumerate(zip(hidden, tokens, strict=True)):
            h[b, T - len(tb):] = hb
            ids[b, T - len(tb):] = torch.tensor(list(tb), dtype=torch.long)
        mask = step.new_token_mask.to(ref.device)
        model = self.models[adapter]
        out = model.mtp_forward(depth, h, ids.to(ref.device), attention_mask=mask,  # type: ignore[operator]
                                cache=_DepthCache(step, self.base + depth - 1, depth), last_logits_only=True,
                                hidden_only=not logits)
        return [out.hidden[b, T - c:] for b, c in enumerate(n_new)], out.logits[:, -1] if logits else out.logits

    def _groups(self, reqs: Sequence[Request], n_new: Sequence[int]) -> list[list[int]]:
        """Row indices per forward: one adapter each, split by ``plan_gathers`` like the main forwards."""
        by_adapter: dict[str | None, list[int]] = {}
        for i, req in enumerate(reqs):
            by_adapter.setdefault(req.adapter, []).append(i)
        return [[rows[g] for g in group] for rows in by_adapter.values()
                for group in plan_gathers([reqs[i].table.length for i in rows], [n_new[i] for i in rows])]

    # --- filling the verified indices ---------------------------------------------------------------------------

    def fill(self, reqs: Sequence[Request], starts: Sequence[int], hidden: Sequence[torch.Tensor],
             tokens: Sequence[Sequence[int]]) -> None:
        """After a main forward: row b's main hidden states ``hidden[b]`` (c_b, dim) at indices ``starts[b] ..
        starts[b] + c_b - 1``, whose tokens ``tokens[b]`` are final (a verification's accepted drafts are not yet
        in the request's output), go through depths 1..D into the cache (the row's table must own their blocks;
        its length is updated by the caller). Sets each row's ``mtp_last`` and the stash of every block whose
        last slot it fills."""
        for group in self._groups(reqs, [h.shape[0] for h in hidden]):
            self._fill([reqs[i] for i in group], [starts[i] for i in group], [hidden[i] for i in group],
                       [tokens[i] for i in group])

    def _fill(self, reqs: list[Request], starts: list[int], hidden: list[torch.Tensor],
              tokens: list[Sequence[int]]) -> None:
        before = [self._before(r, s, h) for r, s, h in zip(reqs, starts, hidden, strict=True)]
        outs = [list(hidden)]  # outs[j][b]: h^j of row b at its new indices
        for j in range(1, self.depth + 1):
            # Depth j at index k takes h^{j-1} at k - 1: the one before the new indices, then all but the last.
            inputs = [torch.cat((before[b][j - 1:j], outs[j - 1][b][:-1])) for b in range(len(reqs))]
            got, _ = self._run(reqs[0].adapter, j, reqs, starts, inputs, tokens, logits=False)
            if j < self.depth:
                outs.append(got)
        for b, (req, start) in enumerate(zip(reqs, starts, strict=True)):
            self._filled(req, start, [o[b] for o in outs])

    def _filled(self, req: Request, start: int, outs: list[torch.Tensor]) -> None:
        """``outs[j]`` (c, dim): h^j, j < D, at the indices ``start ..`` now cached by every depth: the last index's
        become ``req.mtp_last``, and those of an index ending a block go to the stash."""
        bs, e = self.pool.block_size, start + outs[0].shape[0]
        req.mtp_last = (e - 1, torch.stack([o[-1] for o in outs]))
        for k in range(start + (-(start + 1)) % bs, e, bs):  # the indices in [start, e) that end a block
            if self.stash is None:
                self.stash = outs[0].new_zeros(self.pool.n_blocks, self.depth, outs[0].shape[-1])
            self.stash[req.table.blocks[k // bs]] = torch.stack([o[k - start] for o in outs])

    # --- drafting ----------------------------------------------------------------------------------------------

    def draft(self, reqs: Sequence[Request], ks: Sequence[int]) -> list[Draft]:
        """``ks[b]`` drafted tokens for each decoding row (its blocks reserved for ``table.length + 1 + ks[b]``
        tokens; 0: none), from its MTP modules. A row's ``mtp_pending`` verified slots (its last verification's)
        go through the depths in the same forwards, first: a row that drafts nothing has them filled alone."""
        out = [Draft([]) for _ in reqs]
        rows = [i for i, (r, k) in enumerate(zip(reqs, ks, strict=True)) if k > 0 or self._pending(r) is not None]
        n_new = [ks[i] + (0 if (p := self._pending(reqs[i])) is None else p.shape[0]) for i in rows]
        for group in self._groups([reqs[i] for i in rows], n_new):
            picked = [rows[g] for g in group]
            for i, d in zip(picked, self._draft([reqs[i] for i in picked], [ks[i] for i in picked]), strict=True):
                out[i] = d
        return out

    @staticmethod
    def _pending(req: Request) -> torch.Tensor | None:
        """The main hidden states (c, dim) of the row's last c cached slots, kept but not yet through the MTP
        depths; None when there are none (or they belong to a table since rebuilt)."""
        if req.mtp_pending is None or req.mtp_pending[0] + req.mtp_pending[1].shape[0] != req.table.length:
            return None
        return req.mtp_pending[1]

    def _draft(self, reqs: list[Request], ks: list[int]) -> list[Draft]:
        D, B = self.depth, len(reqs)
        L = [r.table.length for r in reqs]
        pend = [self._pending(r) for r in reqs]
        c = [0 if p is None else p.shape[0] for p in pend]
        s = [n - m for n, m in zip(L, c, strict=True)]  # the first index this drafting writes
        before = [self._before(r, s[b], pend[b]) for b, r in enumerate(reqs)]  # a decoding row has s >= 1
        known = [r.tokens(s[b], c[b] + 1) for b, r in enumerate(reqs)]  # the verified tokens, then t_L
        drafts: list[list[int]] = [[] for _ in range(B)]
        qs: list[list[torch.Tensor]] = [[] for _ in range(B)]
        # prev[b]: h^{j-1} of this drafting from index s on (h^0: the pending main hidden states, none if c = 0);
        # verified[b]: h^0 .. h^{j-1} at the pending indices, for mtp_last and the stash.
        prev: list[torch.Tensor] = [before[b][:0] if p is None else p for b, p in enumerate(pend)]
        verified: list[list[torch.Tensor]] = [[p] if p is not None else [] for p in pend]
        for j in range(1, max(max(ks), D if any(c) else 0) + 1):
            if j <= D:  # depth j over s .. L+j-1 for a row drafting j tokens or more; s .. L-1 for one filling
                active = [b for b in range(B) if ks[b] >= j or c[b] > 0]
                n = [c[b] + j if ks[b] >= j else c[b] for b in active]
                starts = [s[b] for b in active]
                hidden = [torch.cat((before[b][j - 1:j], prev[b][:m - 1])) for b, m in zip(active, n, strict=True)]
                tokens = [(known[b] + drafts[b])[:m] for b, m in zip(active, n, strict=True)]
                depth = j
            else:  # depth D one index further, on its own last output
                active = [b for b in range(B) if ks[b] >= j]
                starts = [L[b] + j - 1 for b in active]
                hidden = [prev[b][-1:] for b in active]
                tokens = [drafts[b][-1:] for b in active]
                depth = D
            got, logits = self._run(reqs[0].adapter, depth, [reqs[b] for b in active], starts, hidden, tokens,
                                    logits=any(ks[b] >= j for b in active))
            for a, b in enumerate(active):
                if j <= D:
                    prev[b] = got[a]
                    if c[b] and j < D:
                        verified[b].append(got[a][:c[b]])
                else:
                    prev[b] = torch.cat((prev[b], got[a]))
                if ks[b] >= j:
                    token, q = self._choose(reqs[b], logits[a])
                    drafts[b].append(token)
                    if q is not None:
                        qs[b].append(q)
        for b, req in enumerate(reqs):
            if c[b]:
                self._filled(req, s[b], verified[b])
            req.mtp_pending = None
        return [Draft(drafts[b], torch.stack(qs[b]) if qs[b] else None) for b in range(B)]

    @staticmethod
    def _choose(req: Request, logits_V: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """A draft token from ``logits_V`` under ``req``'s sampling, and the distribution it was drawn from (None:
        the argmax, at temperature 0)."""
        p = req.params
        if p.temperature == 0.0:
            return int(logits_V.argmax()), None
        q = probabilities(logits_V[None], temperature=p.temperature,
                          top_k=p.top_k if p.top_k is not None and p.top_k < logits_V.shape[-1] else None,
                          top_p=p.top_p if p.top_p < 1.0 else None)[0]
        return int(torch.multinomial(q, 1, generator=req.generator)), q


__all__ = ["PagedMTP", "check_mtp"]
