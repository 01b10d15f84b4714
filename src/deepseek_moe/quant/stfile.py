"""Read row ranges from, and stream tensors into, safetensors files with plain reads and writes (no mmap).

Why not ``safe_open``: it maps the file, and every page touched through a mapping counts in the process's
resident set. Quantising a bf16 checkpoint on load would then peak at the file's size plus the quantised
model. Here rows are read with ``pread`` into a small buffer, quantised and dropped, so the peak stays near the
quantised model. Writing is the mirror image: the header (shapes and dtypes are known in advance), then each
tensor's bytes as its producer yields them, so a checkpoint larger than memory can be written.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
}
NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int


class SafetensorsReader:
    """Header of one safetensors file, and row ranges of its tensors read on demand."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: not a safetensors file (bad header: {e})") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            if entry["dtype"] not in DTYPES:
                raise ValueError(f"{self.path}: {key!r} has dtype {entry['dtype']}, which is not supported")
            start, stop = entry["data_offsets"]
            self.tensors[key] = TensorInfo(DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + n + start, 8 + n + stop)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, key: str, rows: slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``rows`` (a step-1 slice over dim 0; all when None) of ``key``, read into ``out`` if given
        (a contiguous tensor of the stored dtype and the slice's shape) or a new tensor."""
        info = self.tensors[key]
        n_rows = info.shape[0] if info.shape else 1
        r0, r1, _ = (rows or slice(None)).indices(n_rows)
        row_bytes = (info.end - info.begin) // max(n_rows, 1)
        shape = (r1 - r0, *info.shape[1:]) if info.shape else ()
        if out is None:
            out = torch.empty(shape, dtype=info.dtype)
        elif out.dtype != info.dtype or tuple(out.shape) != shape or not out.is_contiguous():
            raise ValueError(f"{self.path}: {key!r}: cannot read {info.dtype} {shape} into {out.dtype} "
                             f"{tuple(out.shape)}")
        nbytes = (r1 - r0) * row_bytes if info.shape else info.end - info.begin
        if nbytes:
            view = out.reshape(-1).view(torch.uint8).numpy().data
            with open(self.path, "rb", buffering=0) as f:
                f.seek(info.begin + r0 * row_bytes)
                got = f.readinto(view)
            if got != nbytes:
                raise ValueError(f"{self.path}: {key!r} is truncated (read {got} of {nbytes} bytes)")
        return out


@dataclass
class Entry:
    """One tensor to write: its key, dtype, shape, and a producer yielding its bytes in order as tensors."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(path: str | os.PathLike[str], entries: list[Entry], metadata: dict[str, str] | None = None,
                      progress: Callable[[int], None] | None = None) -> None:
    """Write ``entries`` to ``path`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.key] = {"dtype": NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for e in entries:
            written = 0
            for chunk in e.produce():
                if chunk.dtype != e.dtype:
                    raise ValueError(f"writing {e.key!r}: producer gave {chunk.dtype}, expected {e.dtype}")
                data = chunk.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                f.write(data)
                written += len(data)
                if progress is not None:
                    progress(len(data))
            if written != e.nbytes:
                raise ValueError(f"writing {e.key!r}: producer gave {written} bytes, expected {e.nbytes}")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def row_chunks(n_rows: int, row_elems: int, max_elems: int = 1 << 24) -> Iterator[slice]:
    """Row slices of about ``max_elems`` elements (64 MB of fp32) each."""
    step = max(1, max_elems // max(row_elems, 1))
    for r0 in range(0, n_rows, step):
        yield slice(r0, min(r0 + step, n_rows))
