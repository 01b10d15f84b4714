"""What a decoding row may draft in a scheduler step, whichever drafter draws the tokens: the room (budget,
request limits, grammar), the blocks for the drafted slots, and prompt-lookup (n-gram) drafts. MTP drafts are
drawn for all rows at once after the step is planned (serve/mtp_drafting.py)."""

from __future__ import annotations

from deepseek_moe.infer.draft import Draft, NgramDrafter
from deepseek_moe.model.kv_cache import BlockPool
from deepseek_moe.serve.request import Request


def draft_room(req: Request, budget: int, num_draft_tokens: int, capacity: int) -> int:
    """The most tokens decoding row ``req`` may draft: within ``num_draft_tokens``, the step's token ``budget``
    and its room (``capacity``: the most tokens a request can hold; its max_tokens, counting the token the
    verification emits besides the accepted drafts). 0 for a row with a grammar: each position's logits are
    masked to what it allows, and a draft would bypass that."""
    if req.constraint is not None:
        return 0
    p = req.params
    room = capacity - req.n_tokens  # its cached tokens + 1 + k stay within capacity
    if p.max_tokens is not None:
        room = min(room, p.max_tokens - len(req.output) - 1)
    return max(min(num_draft_tokens, budget, room), 0)


def reserve_draft(pool: BlockPool, req: Request, k: int, n_running: int) -> bool:
    """Give ``req``'s table the blocks for its next token and ``k`` drafted ones, if the pool has them free beyond
    a block for each of the ``n_running`` rows' own next token, so that a draft does not push a later row into
    preemption this step (a prefill chunk needing several can still find the pool short: rare, and a preempted
    request's output is unchanged). False: no draft this step."""
    n = req.table.length + 1 + k
    need = pool.blocks_for(n) - len(req.table.blocks)
    if need > 0 and pool.free_blocks - need < n_running:
        return False
    return pool.reserve(req.table, n)


def ngram_draft(drafter: NgramDrafter, req: Request, k: int) -> Draft:
    """Up to ``k`` tokens that followed the latest earlier occurrence of ``req``'s last tokens."""
    draft = drafter.propose(req.tokens(0, req.n_tokens), k)
    return Draft(draft.tokens[:k], None if draft.q is None else draft.q[:k])


__all__ = ["draft_room", "ngram_draft", "reserve_draft"]
