"""The KV cache: inference state kept outside the modules and passed into ``forward``.

One ``LayerCache`` per block holds that block's tensors along the sequence axis: for MLA the normalised latent
c_kv (B, S, kv_lora_rank) and the RoPE'd shared key k_pe (B, S, qk_rope_head_dim); for standard attention the
full keys (B, S, H, qk_head_dim) and values (B, S, H, v_head_dim). The ``KVCache`` also keeps which slots hold
real tokens (``mask``, False for left padding), from which the model derives each row's positions.

Storage grows by doubling, so a decode step is an in-place write rather than a copy of the whole history.
"""

from __future__ import annotations

import torch


class LayerCache:
    """Growable sequence-axis storage for a fixed number of tensors (dim 1 is the sequence axis)."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self.length = 0

    def append(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write ``new`` (each (B, T, ...)) after the cached slots; return views of all slots, (B, S, ...)."""
        t = new[0].shape[1]
        if not self._buffers:
            self._buffers = [x.new_empty(x.shape[0], max(t, 16), *x.shape[2:]) for x in new]
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
        for buf, x in zip(self._buffers, new, strict=True):
            buf[:, self.length : needed] = x
        self.length = needed
        return tuple(buf[:, :needed] for buf in self._buffers)

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

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_per_token(self) -> float:
        """Cache bytes per cached slot per sequence, summed over layers."""
        if self.mask is None or self.mask.numel() == 0:
            return 0.0
        return self.nbytes() / self.mask.numel()
