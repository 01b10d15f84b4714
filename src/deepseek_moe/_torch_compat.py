"""What we use of torch that is not its public API, in one place, each with why no public way serves.

A torch release may rename or drop any of these. tests/unit/test_torch_compat.py checks each against the
installed torch and says which one changed, so an upgrade breaks one named test instead of a training run or an
export. The ones of torch.distributed are in ``deepseek_moe/parallel/_torch_compat.py`` (only parallel/ imports
torch.distributed). Nothing else in the package reaches into torch's privates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def tensor_version(t: torch.Tensor) -> int:
    """``t``'s counter of in-place writes (``Tensor._version``). Compute copies compare it to learn that their
    master changed; torch offers no public way to ask."""
    return int(t._version)


def mkldnn_bf16_supported() -> bool:
    """Whether torch sends bf16 matmuls to oneDNN on this CPU (``torch.ops.mkldnn._is_mkldnn_bf16_supported``):
    torch has no public question for it. False where the op is gone or fails."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def clear_dispatch_cache(op: Any) -> None:
    """Forget what ``op`` (an ``OpOverload``) resolved its kernel to last time (``OpOverload._dispatch_cache``):
    torch.onnx swaps in decompositions for an export and restores them after, but the cache keeps the first
    resolution (export/onnx.py says when that bites). No public call clears it; where the cache is gone, so is
    the problem, and this does nothing."""
    cache = getattr(op, "_dispatch_cache", None)
    if cache is not None:
        cache.clear()


class KeepsDtypeOnCast(nn.Module):
    """A module whose buffers named by :meth:`kept_dtype_buffers` keep their dtype when the module is cast
    (``.to(dtype)``, ``.half()``, ``.bfloat16()`` ...) while still moving with it (``.to(device)``,
    ``to_empty``). The dtype it was cast to is recorded as ``self.dtype``.

    torch has no public hook for casts: ``Module.to`` and the others run ``_apply(fn)`` on every submodule with
    ``fn`` the per-tensor conversion, so this overrides ``_apply`` and tells a cast from a move by what ``fn``
    does to two empty probes (a cast gives both one dtype; a move keeps each one's).
    """

    dtype: torch.dtype

    def kept_dtype_buffers(self) -> list[str]:
        raise NotImplementedError

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        kept = {n: t for n in self.kept_dtype_buffers() if (t := getattr(self, n)) is not None}
        device = next(iter(kept.values())).device if kept else torch.device("cpu")
        p16 = fn(torch.empty(0, dtype=torch.float16, device=device))
        p32 = fn(torch.empty(0, dtype=torch.float32, device=device))
        cast = p16.dtype == p32.dtype
        super()._apply(fn, recurse)
        for n, t in kept.items():
            setattr(self, n, t.to(p32.device) if cast else fn(t))  # a registered buffer: stays one
        if cast:
            self.dtype = p32.dtype
        return self


__all__ = ["KeepsDtypeOnCast", "clear_dispatch_cache", "mkldnn_bf16_supported", "tensor_version"]
