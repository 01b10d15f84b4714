"""What parallel/ uses of torch.distributed that is not public API (see ``deepseek_moe/_torch_compat.py`` for
the rest), checked against the installed torch by tests/unit/test_torch_compat.py."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement


def compute_local_shape_and_global_offset(global_shape: Sequence[int], mesh: DeviceMesh,
                                          placements: Sequence[Placement]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, offset in the global tensor) of this rank's part of a DTensor of ``global_shape`` laid out by
    ``placements`` over ``mesh``; an empty offset on a rank outside the mesh. torch's own function
    (``torch.distributed.tensor._utils``), the one DCP uses: it knows every placement, FSDP2's strided shards
    over an expert-parallel dimension included, which no public call reports."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset as torch_fn

    shape, offset = torch_fn(torch.Size(global_shape), mesh, placements)
    return tuple(shape), tuple(offset)


def check() -> None:
    """Raise naming what changed if the installed torch no longer offers what this module takes from it."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset as torch_fn
    except ImportError as e:
        raise RuntimeError(f"torch {torch.__version__}: torch.distributed.tensor._utils."
                           "compute_local_shape_and_global_offset is gone; parallel/_torch_compat.py needs another "
                           "way to find a DTensor shard's offset") from e
    params = list(inspect.signature(torch_fn).parameters)[:3]
    if params != ["global_shape", "mesh", "placements"]:
        raise RuntimeError(f"torch {torch.__version__}: compute_local_shape_and_global_offset takes {params}, not "
                           "(global_shape, mesh, placements)")


__all__ = ["check", "compute_local_shape_and_global_offset"]
