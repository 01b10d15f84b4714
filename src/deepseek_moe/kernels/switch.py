"""One switch for the inference fast paths: ``reference_paths()`` makes every layer that has a fast path (the
float, bf16 and quantised matmul kernels, the fused routed experts, the fused absorbed-attention decode, the
rotation as a complex product) take its plain PyTorch twin instead, in this thread, for as long as the context
lasts. Tracing (torch.compile, torch.export and so the ONNX exporter) always takes the plain paths: the kernels
read data pointers a traced tensor has not.

Why a context rather than a config field: the choice changes no result beyond rounding and no checkpoint, so it
is not part of a model's description; tests and benchmarks run both paths side by side in one process.
``DEEPSEEK_MOE_KERNELS=0`` turns the compiled kernels off for the whole process as before.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

_reference = contextvars.ContextVar("deepseek_moe_reference_paths", default=False)


def fast_paths_enabled() -> bool:
    """False inside :func:`reference_paths` and while torch traces (compiles or exports) a graph."""
    # Tracing first: dynamo reads is_compiling() as a constant, while the ContextVar would break its graph.
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and (compiler.is_compiling() or getattr(compiler, "is_exporting", bool)()):
        return False
    return not _reference.get()


@contextlib.contextmanager
def reference_paths(enabled: bool = True) -> Iterator[None]:
    """Take the plain PyTorch paths inside this context (``enabled=False``: leave the choice as it is)."""
    token = _reference.set(enabled or _reference.get())
    try:
        yield
    finally:
        _reference.reset(token)


__all__ = ["fast_paths_enabled", "reference_paths"]
