"""The KV cache: inference state kept outside the modules and passed into ``forward``.

One ``LayerCache`` per block holds that block's tensors along the sequence axis: for MLA the normalised latent
c_kv (B, S, kv_lora_rank) and the RoPE'd shared key k_pe (B, S, qk_rope_head_dim); for standard attention the
full keys (B, S, H, qk_head_dim) and values (B, S, H, v_head_dim). The ``KVCache`` also keeps which slots hold
real tokens (``mask``, False for left padding), from which the model derives each row's positions.

Storage grows by doubling, so a decode step is an in-place write rather than a copy of the whole history.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence

import torch


class LayerCache:
    """Growable sequence-axis storage for a fixed number of tensors (dim 1 is the sequence axis)."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self.length = 0

    def append(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write ``new`` (each (B, T, ...)) after the cached slots; return views of all slots, (B, S, ...)."""
        slots, cached = self.grow(new[0].shape[1], *new)
        for slot, x in zip(slots, new, strict=True):
            slot.copy_(x)
        return cached

    @property
    def dtype(self) -> torch.dtype | None:
        """What the storage holds (None before the first write)."""
        return self._buffers[0].dtype if self._buffers else None

    def grow(self, t: int, *like: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Count ``t`` more slots as cached, for tensors shaped like ``like`` (each (B, t, ...), read for shapes and
        dtype only), and return (views of the t new slots, for the caller to write; views of all slots (B, S, ...)).
        :meth:`append` is this and a copy; a kernel that computes the new slots writes them in place
        (kernels/mla_decode.py ``prepare``)."""
        if not self._buffers:
            self._buffers = [x.new_empty(x.shape[0], max(t, 16), *x.shape[2:]) for x in like]
        needed = self.length + t
        capacity = self._buffers[0].shape[1]
        if needed > capacity:
            capacity = max(needed, 2 * capacity)
            grown = []
            for buf in self._buffers:
                bigger = buf.new_empty(buf.shape[0], capacity, *buf.shape[2:])
                bigger[:, : self.length] = buf[:, : self.length]
                grown.append(bigger)
            self._buffers = grown
        start, self.length = self.length, needed
        return (tuple(buf[:, start:needed] for buf in self._buffers), tuple(buf[:, :needed] for buf in self._buffers))

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on (the storage is kept and written again by the next append)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} slots to {length}")
        self.length = length

    def numel(self) -> int:
        """Elements in the cached slots (not the spare capacity)."""
        return sum(b[:, : self.length].numel() for b in self._buffers)

    def nbytes(self) -> int:
        return sum(b[:, : self.length].numel() * b.element_size() for b in self._buffers)


class KVCache:
    """Per-layer caches plus the key mask (B, S) shared by all layers: True where a slot holds a real token."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layers)]
        self.mask: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def extend_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Record the mask (B, T) of tokens about to be cached; return the mask of all slots (B, S + T)."""
        self.mask = new_mask if self.mask is None else torch.cat((self.mask, new_mask), dim=1)
        return self.mask

    def discard(self, rejected: torch.Tensor) -> None:
        """Forget the slots marked in ``rejected`` (B, T), which covers the last T slots: speculative decoding's
        rejected draft tokens. They become holes like left padding: masked from every later query and counted in
        no position. Trailing slots no row holds any more are dropped from every layer, so a single sequence,
        or a batch whose rows all rejected the same tail, keeps no holes."""
        if self.mask is None or rejected.dim() != 2 or rejected.shape[0] != self.mask.shape[0] \
                or rejected.shape[1] > self.mask.shape[1]:
            raise ValueError(f"discard: rejected of shape {tuple(rejected.shape)} for a cache mask of shape "
                             f"{None if self.mask is None else tuple(self.mask.shape)}")
        S, T = self.mask.shape[1], rejected.shape[1]
        mask = self.mask.clone()
        mask[:, S - T:] &= ~rejected.to(mask.device, torch.bool)
        held = mask.any(dim=0).nonzero()
        keep = int(held[-1]) + 1 if held.numel() else 0
        self.mask = mask[:, :keep]
        for layer in self.layers:
            layer.truncate(min(layer.length, keep))

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_per_token(self) -> float:
        """Cache bytes per cached slot per sequence, summed over layers."""
        if self.mask is None or self.mask.numel() == 0:
            return 0.0
        return self.nbytes() / self.mask.numel()


# --- Paged storage for serving -------------------------------------------------------------------------------
#
# A server holds many sequences of different lengths that join and leave the running batch at every step. The
# dense cache above would have to re-pad and copy every row whenever the batch changes. Here each layer keeps one
# pool of fixed-size blocks (block_size slots each) shared by all sequences; a sequence owns a list of block ids
# (its ``BlockTable``). Joining or leaving the batch moves no cached data: blocks are handed out and returned.
#
# A step builds a ``PagedKVCache``, a KVCache over the rows of that step: ``append`` writes each row's new tokens
# into its blocks (one index_copy_ per tensor) and returns (B, S, ...) views gathered from the pool by one
# index_select, left-padded to the longest row, with the key mask hiding the padding. That gather is the only
# per-step copy: the attention in plain PyTorch reads every cached slot anyway, so it costs one more pass over the
# same bytes, never a re-layout of the stored cache. Block 0 is never handed out: padding slots read its zeros
# (zeros, not garbage: a masked slot's value is multiplied by a zero probability, and 0 * NaN would be NaN).
#
# The padding is what can make a gather large: one long row among many short ones pads them all to its length,
# B x S_max slots per layer, which can exceed the whole pool. ``plan_gathers`` splits a step's rows into forwards
# of similar length so that each gathers at most GATHER_BOUND times the slots its rows really hold; as those
# rows' slots are all in the pool, the gathers of a whole step (all its forwards, all layers) come to at most
# GATHER_BOUND x the pool's bytes (the server's kv_cache_bytes), and only one layer's gather is alive at a time.
# ``BlockPool.gathered_bytes`` counts what is gathered, so tests check the bound on bytes, not on timings.

GATHER_BOUND = 2


def plan_gathers(cached: list[int], new: list[int], bound: float = GATHER_BOUND) -> list[list[int]]:
    """Split rows (row i: ``cached[i]`` tokens in the cache, appending ``new[i]``) into groups, one forward each,
    such that each group's padded slots, rows x (max cached + max new), are at most ``bound`` x its real slots,
    sum(cached + new). Longest rows first; a row that would break the bound starts the next group (a row alone
    always fits). Returns row indices per group."""
    if bound < 1:
        raise ValueError(f"bound ({bound}) must be >= 1: a row alone pads nothing")
    groups: list[list[int]] = []
    max_cached = max_new = real = 0
    for i in sorted(range(len(cached)), key=lambda i: cached[i] + new[i], reverse=True):
        c, n = max(max_cached, cached[i]), max(max_new, new[i])
        if groups and (len(groups[-1]) + 1) * (c + n) <= bound * (real + cached[i] + new[i]):
            groups[-1].append(i)
            max_cached, max_new, real = c, n, real + cached[i] + new[i]
        else:
            groups.append([i])
            max_cached, max_new, real = cached[i], new[i], cached[i] + new[i]
    return groups


class BlockTable:
    """The blocks one sequence holds, in order, how many of their slots hold cached tokens, and how many of its
    first blocks the pool has been given content keys for (``BlockPool.register``)."""

    def __init__(self) -> None:
        self.blocks: list[int] = []
        self.length = 0
        self.registered = 0

    def clear(self) -> None:
        """Forget the blocks without returning them (the pool is being ``reset``)."""
        self.blocks, self.length, self.registered = [], 0, 0


FREE, CACHED, IN_USE = 1, 2, 0  # a block's state in ``BlockPool._state`` (block 0, the padding, counts as in use)


def chain_block_hashes(tokens: Sequence[int], block_size: int, salt: bytes = b"",
                       known: list[bytes] | None = None) -> list[bytes]:
    """The content keys of the full blocks of ``tokens``: block i's key hashes its ``block_size`` tokens chained
    with block i-1's key (the first with ``salt``), so equal keys mean equal tokens from position 0, hence equal
    cached latents (what a slot caches depends on its token and every token before it). ``salt`` separates
    caches that the same tokens must not share (another adapter's latents differ). ``known``: keys of a prefix
    already computed, extended rather than recomputed (a decoding sequence adds one token at a time)."""
    keys = list(known or [])
    for i in range(len(keys), len(tokens) // block_size):
        h = hashlib.blake2b(keys[-1] if keys else b"salt:" + salt, digest_size=16)
        h.update(array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes())
        keys.append(h.digest())
    return keys


class BlockPool:
    """``n_blocks`` blocks of ``block_size`` slots per layer; the tensors are allocated at the first append, when
    their trailing shapes and dtype are known, and left uninitialised (the OS maps pages as blocks are first
    written; a slot is always written before it is read) except the zeroed padding block.

    Prefix caching (``prefix_cache``): a full block whose tokens are final can be ``register``-ed under its
    content key (``chain_block_hashes``); ``match`` then hands it to any table whose tokens start the same, and
    blocks are reference-counted (a block is in use while any table holds it). A released block that has a key
    is not freed but kept, unowned, in an LRU: it is still found by ``match``, and it is taken for new content
    (its key dropped) only when no block without content is left. So every block but block 0 is in exactly one
    state: free (no content, on ``_free``), cached (a key, no owner, in ``_lru``) or in use (refs > 0).

    A shared block is never written: ``match`` hands out only whole blocks, and a table writes at its length
    onwards, past them. What may be registered is the caller's contract: only blocks whose every slot holds
    the latents of its final tokens (not a speculative draft a rollback may take back; ``truncate`` refuses to
    cut into a registered block)."""

    def __init__(self, n_layers: int, n_blocks: int, block_size: int, *, prefix_cache: bool = True) -> None:
        if n_blocks < 2:
            raise ValueError(f"n_blocks ({n_blocks}) must be >= 2 (block 0 is reserved for padding)")
        if block_size < 1:
            raise ValueError(f"block_size ({block_size}) must be >= 1")
        self.n_layers, self.n_blocks, self.block_size = n_layers, n_blocks, block_size
        self.prefix_cache = prefix_cache
        self.storage: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]  # per layer: (n_slots, ...)
        self.reset()
        self.gathered_bytes = 0  # all the (B, S, ...) views ``append`` has gathered, padding included
        self.evictions = 0  # cached blocks taken for new content

    @property
    def capacity_blocks(self) -> int:
        """Blocks sequences can own (all but the padding block)."""
        return self.n_blocks - 1

    @property
    def free_blocks(self) -> int:
        """Blocks a reservation can take: free ones and cached ones no table holds (evicted as needed)."""
        return len(self._free) + len(self._lru)

    @property
    def cached_blocks(self) -> int:
        """Blocks kept for their content with no owner (the LRU)."""
        return len(self._lru)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def _take(self) -> int:
        """A block for new content: a free one, else the least recently released cached one (its key dropped)."""
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._lru.popitem(last=False)
            del self._block_of[self._key_of.pop(b)]
            self.evictions += 1
        self._state[b], self._refs[b] = IN_USE, 1
        return b

    def reserve(self, table: BlockTable, n_tokens: int) -> bool:
        """Give ``table`` enough blocks to hold ``n_tokens`` in all; False (nothing taken) if too few are free."""
        need = self.blocks_for(n_tokens) - len(table.blocks)
        if need > self.free_blocks:
            return False
        for _ in range(max(need, 0)):
            table.blocks.append(self._take())
        return True

    def release(self, table: BlockTable) -> None:
        """Drop ``table``'s hold on its blocks. Its last blocks go first: a block unowned now returns to the free
        list, or, with a key, to the LRU's most recent end with the sequence's earlier blocks after it, so that
        eviction takes a sequence's tail before the prefix other requests are likelier to share."""
        for b in reversed(table.blocks):
            self._unref(b)
        table.blocks, table.length, table.registered = [], 0, 0

    def _unref(self, b: int) -> None:
        self._refs[b] -= 1
        if self._refs[b] > 0:
            return
        if b in self._key_of:
            self._lru[b] = None
            self._state[b] = CACHED
        else:
            self._free.append(b)
            self._state[b] = FREE

    def truncate(self, table: BlockTable, n_tokens: int) -> None:
        """Keep ``table``'s first ``n_tokens`` cached tokens and drop the blocks past them (a rollback). The
        block the cut falls in must not be registered: its slots past the cut will be written again."""
        if not 0 <= n_tokens <= table.length:
            raise ValueError(f"truncate to {n_tokens} tokens: the table caches {table.length}")
        keep = self.blocks_for(n_tokens)
        if n_tokens % self.block_size and table.blocks[keep - 1] in self._key_of:
            raise ValueError(f"truncate to {n_tokens} tokens cuts into block {table.blocks[keep - 1]}, which is "
                             "registered: only blocks of final tokens may be registered")
        for b in reversed(table.blocks[keep:]):
            self._unref(b)
        del table.blocks[keep:]
        table.length = n_tokens
        table.registered = min(table.registered, n_tokens // self.block_size)

    def match(self, table: BlockTable, keys: Sequence[bytes]) -> int:
        """Extend an empty or block-aligned ``table`` with the cached blocks of the longest run of ``keys`` (the
        content keys of its blocks from the first) found after the blocks it caches; returns how many blocks it
        gained, each now held by the table too. The blocks it owns beyond its length (reserved, not yet
        written) are replaced by the cached ones and freed."""
        bs = self.block_size
        if not self.prefix_cache or table.length % bs:
            return 0
        start = table.length // bs
        n = 0
        while start + n < len(keys) and keys[start + n] in self._block_of:
            n += 1
        if n == 0:
            return 0
        spare = table.blocks[start:]  # reserved, not yet written: the cached blocks take their place
        found = [self._block_of[k] for k in keys[start:start + n]]
        for b in found:
            if self._refs[b] == 0:
                del self._lru[b]
                self._state[b] = IN_USE
            self._refs[b] += 1
        table.blocks[start:] = found + spare[n:]
        table.length = (start + n) * bs
        table.registered = start + n
        for b in reversed(spare[:n]):
            self._unref(b)
        return n

    def fork(self, src: BlockTable, dst: BlockTable) -> bool:
        """Make the empty table ``dst`` cache what ``src`` caches without computing it again (``n`` > 1 choices
        of one prompt): ``src``'s full blocks are shared (one more reference each; never written, as for
        ``match``, since a table writes past its length), and a partly filled last block is copied into a block
        of ``dst``'s own, as both will write into its free slots. Returns False, taking nothing, when no block is
        free for that copy."""
        if dst.blocks or dst.length:
            raise ValueError(f"fork into a table that holds {len(dst.blocks)} blocks: it must be empty")
        bs = self.block_size
        full, rest = divmod(src.length, bs)
        if rest and not self.free_blocks:
            return False
        for b in src.blocks[:full]:
            self._refs[b] += 1
        dst.blocks = src.blocks[:full]
        if rest:
            b, s = self._take(), src.blocks[full]
            for layer in self.storage:
                for buf in layer:
                    buf[b * bs:b * bs + rest] = buf[s * bs:s * bs + rest]
            dst.blocks.append(b)
        dst.length, dst.registered = src.length, min(src.registered, full)
        return True

    def register(self, table: BlockTable, keys: Sequence[bytes]) -> None:
        """Record the content keys of ``table``'s full cached blocks (``keys[i]`` is block i's, at most as many as
        its full blocks), so that ``match`` can share them. A key already held by another block (two requests
        computed the same prefix at once) leaves this block unregistered: it is freed with its table."""
        if not self.prefix_cache:
            return
        n = min(len(keys), table.length // self.block_size)
        for i in range(table.registered, n):
            b, key = table.blocks[i], keys[i]
            if b not in self._key_of and key not in self._block_of:
                self._key_of[b], self._block_of[key] = key, b
        table.registered = max(table.registered, n)

    def reset(self) -> None:
        """Every block free again, the cached content forgotten (the owners' tables must be dropped: recovery from
        a broken invariant)."""
        self._free = list(range(self.n_blocks - 1, 0, -1))  # a stack; block 0 stays out
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks no table holds, least recent first
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._refs = [0] * self.n_blocks
        # Each block's state as a byte too, so ``audit`` costs O(blocks owned) plus a C-speed count, not a Python
        # pass over the pool: a tiny model's 1 GiB pool has ~10^5 blocks, and the audit runs after every step.
        self._state = bytearray(bytes([IN_USE]) + bytes([FREE]) * (self.n_blocks - 1))

    def audit(self, tables: list[BlockTable]) -> list[str]:
        """What is wrong with the ownership, given every table that holds blocks: each block but the padding block
        0 is free, cached (keyed, unowned) or in use, and a block in use is held by exactly as many tables as its
        reference count says (a table never holds a block twice). Empty when all is well."""
        problems = []
        holders: Counter[int] = Counter()
        for t in tables:
            if len(set(t.blocks)) != len(t.blocks):
                twice = sorted(b for b, n in Counter(t.blocks).items() if n > 1)
                problems.append(f"a table holds blocks more than once: {twice[:8]}")
            holders.update(t.blocks)
        bad = sorted(b for b in holders if not 0 < b < self.n_blocks or self._state[b] != IN_USE)
        if bad:
            problems.append(f"blocks held but free or cached, or not in the pool's range [1, {self.n_blocks}): "
                            f"{bad[:8]}")
        miscounted = sorted(b for b, n in holders.items() if 0 < b < self.n_blocks and self._refs[b] != n)
        if miscounted:
            problems.append("blocks whose reference count is not the number of tables holding them: "
                            + ", ".join(f"{b} ({self._refs[b]} refs, {holders[b]} holders)" for b in miscounted[:8]))
        if self._state.count(FREE) != len(self._free) or len(set(self._free)) != len(self._free):
            problems.append(f"the free list holds {len(self._free)} blocks, {self._state.count(FREE)} are marked "
                            "free (a block released twice, or the list edited)")
        if self._state.count(CACHED) != len(self._lru):
            problems.append(f"the LRU holds {len(self._lru)} blocks, {self._state.count(CACHED)} are marked cached")
        if any(b not in self._key_of or self._refs[b] for b in self._lru):
            problems.append("a block in the LRU has no key or is still held")
        if len(self._key_of) != len(self._block_of) or any(self._block_of.get(k) != b for b, k in self._key_of.items()):
            problems.append("the key -> block and block -> key maps disagree")
        if any(self._key_of.get(b) is not None for b in self._free):
            problems.append("a free block still has a key")
        in_use = self.capacity_blocks - len(self._free) - len(self._lru)
        if in_use != len(holders):
            problems.append(f"{in_use} blocks in use but {len(holders)} held")
        return problems

    def nbytes(self) -> int:
        """Bytes of the allocated pool tensors (their full capacity, reserved or not)."""
        return sum(t.numel() * t.element_size() for layer in self.storage for t in layer)

    def batch(self, tables: list[BlockTable], n_new: list[int]) -> PagedKVCache:
        """The cache of one step whose row i appends ``n_new[i]`` tokens to the sequence of ``tables[i]``.

        The model's input is (B, T = max n_new), each row's new tokens right-aligned (``new_token_mask``); the
        slots are (B, S = max cached + T): each row's cached tokens, then its new ones in the last T columns.
        """
        return PagedKVCache(self, tables, n_new)


class PagedLayerCache(LayerCache):
    """One layer's view of a step: writes go into the pool, ``append`` returns gathered (B, S, ...) views."""

    def __init__(self, pool: BlockPool, layer: int, step: PagedKVCache) -> None:
        super().__init__()
        self.pool, self.layer, self.step = pool, layer, step

    def append(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        step = self.step
        storage = self.pool.storage[self.layer]
        if not storage:
            n_slots = self.pool.n_blocks * self.pool.block_size
            for x in new:
                buf = x.new_empty(n_slots, *x.shape[2:])  # pages are touched only as blocks are written
                buf[: self.pool.block_size].zero_()  # the padding block
                storage.append(buf)
        out = []
        for buf, x in zip(storage, new, strict=True):
            if x.shape[:2] != step.new_token_mask.shape:
                raise ValueError(f"paged cache: new tokens of shape {tuple(x.shape[:2])}, the step was planned "
                                 f"for {tuple(step.new_token_mask.shape)}")
            buf.index_copy_(0, step.write_slots, x[step.new_token_mask].to(buf.dtype))
            # index_select on the flat slot list is several times faster than advanced indexing on CPU.
            out.append(buf.index_select(0, step.read_slots_flat).view(*step.read_slots.shape, *buf.shape[1:]))
            self.pool.gathered_bytes += out[-1].numel() * out[-1].element_size()
        self.length = step.read_slots.shape[1]
        return tuple(out)

    def numel(self) -> int:
        return sum(t[0].numel() for t in self.pool.storage[self.layer]) * self.step.n_cached_tokens

    def nbytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.pool.storage[self.layer]) * self.step.n_cached_tokens


class PagedKVCache(KVCache):
    """A KVCache over one step's rows, backed by a BlockPool. Use it for one forward, then call ``commit()`` to
    record the new tokens as cached in each row's BlockTable (so a failed forward leaves the tables as they were:
    the slots it wrote are past each table's length and are simply written again)."""

    def __init__(self, pool: BlockPool, tables: list[BlockTable], n_new: list[int]) -> None:
        if len(tables) != len(n_new) or not tables:
            raise ValueError(f"paged cache: {len(tables)} tables for {len(n_new)} rows (need >= 1, equal)")
        super().__init__(0)
        self.pool, self.tables, self.n_new = pool, tables, n_new
        bs = pool.block_size
        for i, (table, n) in enumerate(zip(tables, n_new, strict=True)):
            if n < 1 or table.length + n > len(table.blocks) * bs:
                raise ValueError(f"paged cache: row {i} appends {n} tokens to {table.length} cached, but owns "
                                 f"{len(table.blocks)} blocks of {bs} slots (reserve them first)")
        B, T = len(tables), max(n_new)
        cached = torch.tensor([t.length for t in tables])  # (B,)
        new = torch.tensor(n_new)  # (B,)
        S = int(cached.max()) + T
        col = torch.arange(S)[None, :]  # (1, S)
        pad = S - T - cached[:, None]  # left padding before the cached tokens
        is_cached = (col >= pad) & (col < S - T)
        is_new = col >= S - new[:, None]
        # The logical index (position in its own sequence) of each slot, -1 for padding.
        logical = torch.where(is_cached, col - pad, torch.where(is_new, cached[:, None] + col - (S - new[:, None]),
                                                               torch.full_like(col, -1)))
        width = max(len(t.blocks) for t in tables)
        block_ids = torch.zeros(B, width, dtype=torch.long)
        for i, table in enumerate(tables):
            block_ids[i, : len(table.blocks)] = torch.tensor(table.blocks, dtype=torch.long)
        safe = logical.clamp(min=0)
        slots = block_ids.gather(1, safe // bs) * bs + safe % bs
        real = logical >= 0
        self.mask: torch.Tensor = real
        self.new_token_mask = is_new[:, S - T:]  # (B, T)
        self.read_slots = torch.where(real, slots, torch.zeros_like(slots))  # (B, S); padding reads block 0
        self.read_slots_flat = self.read_slots.reshape(-1)
        self.write_slots = slots[:, S - T:][self.new_token_mask]  # (N new tokens,), row-major like x[mask]
        self.n_cached_tokens = int(real.sum())
        self.layers = [PagedLayerCache(pool, i, self) for i in range(pool.n_layers)]
        self._device: torch.device | None = None

    def extend_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        """The key mask of all slots (B, S); ``new_mask`` must be this step's ``new_token_mask``."""
        if new_mask.shape != self.new_token_mask.shape or not bool(
                (new_mask.to(torch.bool) == self.new_token_mask.to(new_mask.device)).all()):
            raise ValueError("paged cache: the attention mask of the new tokens is not the one the step planned "
                             "(pass attention_mask=cache.new_token_mask)")
        device = new_mask.device
        if self._device != device:  # index tensors live beside the model
            self.mask, self.new_token_mask = self.mask.to(device), self.new_token_mask.to(device)
            self.read_slots, self.write_slots = self.read_slots.to(device), self.write_slots.to(device)
            self.read_slots_flat = self.read_slots.reshape(-1)
            self._device = device
        return self.mask

    def commit(self) -> None:
        for table, n in zip(self.tables, self.n_new, strict=True):
            table.length += n

    def discard(self, rejected: torch.Tensor) -> None:
        raise NotImplementedError("a paged cache rolls back through BlockPool.truncate: its rows are block tables")
