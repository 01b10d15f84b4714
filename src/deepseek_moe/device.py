"""``resolve_device``: a device name from a flag or config as a torch.device, checked."""

from __future__ import annotations

import torch


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a torch.device ("auto" or None: cuda when available, else cpu). ValueError naming it when it is
    not a device or asks for CUDA on a machine without it."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{name!r} is not a torch device (cpu, cuda, cuda:1, ...): {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name!r} asks for CUDA, which this machine does not have")
    return device


__all__ = ["resolve_device"]
