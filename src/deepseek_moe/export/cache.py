"""The KV-cache interface over explicit tensors, for graphs that take the cache in and give it back out.

The model's attention calls ``layer_cache.append(*new)`` and gets the full (B, S, ...) tensors back; the model
calls ``cache.extend_mask(new_mask)`` for the key mask. Here the past tensors are graph inputs and ``append``
is a concatenation whose result, ``present``, becomes a graph output: the same interface as
:mod:`deepseek_moe.model.kv_cache`, with no state outside the graph (ONNX Runtime holds the tensors between
steps). Not a second public cache type: it exists for export only.
"""

from __future__ import annotations

import torch


class TensorLayerCache:
    """One layer's cached tensors as plain tensors: ``past`` in, ``present`` = past + new out."""

    def __init__(self, past: tuple[torch.Tensor, ...] = ()) -> None:
        self.past = past
        self.present: tuple[torch.Tensor, ...] = ()

    def append(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Concatenate ``new`` (each (B, T, ...)) after the past slots; return all slots (B, S, ...)."""
        if self.past:
            self.present = tuple(torch.cat((p, n), dim=1) for p, n in zip(self.past, new, strict=True))
        else:
            self.present = tuple(new)
        return self.present


class TensorKVCache:
    """Per-layer :class:`TensorLayerCache` plus the key mask (B, S) of the past slots (None: no past)."""

    def __init__(self, pasts: list[tuple[torch.Tensor, ...]], past_mask: torch.Tensor | None = None) -> None:
        self.layers = [TensorLayerCache(p) for p in pasts]
        self.mask = past_mask

    def extend_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Record the mask (B, T) of the new tokens; return the mask of all slots (B, S + T)."""
        self.mask = new_mask if self.mask is None else torch.cat((self.mask, new_mask), dim=1)
        return self.mask

    def present(self) -> list[torch.Tensor]:
        """Every layer's full tensors, flat: layer 0's (c_kv, k_pe), then layer 1's, ..."""
        return [t for layer in self.layers for t in layer.present]
