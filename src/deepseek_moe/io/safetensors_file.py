"""Reading safetensors files straight into tensors we own, without a memory map.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte range of
the data section) and the raw little-endian data. ``safe_open`` maps the file: every page it touches counts in
our resident memory until the file is closed, so reading a whole checkpoint through it costs the file's size on
top of the model's. Here the header is parsed once and each tensor is ``preadv``-ed into the storage of the
tensor that keeps it (the parameter itself, or a stacked expert's row); a dtype conversion goes through one
small reused buffer. The page cache then holds the file, but no page of it is mapped into this process.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

# safetensors dtype codes (https://github.com/huggingface/safetensors, format spec) -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
# Bytes converted per step when the stored dtype differs from the destination's (bounds the extra memory).
CONVERT_CHUNK_BYTES = 16 << 20
_MAX_HEADER = 100 << 20


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: its dtype and shape as stored, and the absolute byte offset of its data."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class SafetensorsFile:
    """The header of one file plus an open descriptor; ``read_into`` fills tensors from it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.tensors, self.metadata = _parse_header(self.path)
        self._fd: int | None = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise SafetensorsError(f"{self.path}: has no tensor {key!r}") from None

    def read_bytes_into(self, out: torch.Tensor, offset: int) -> None:
        """Fill the contiguous CPU tensor ``out`` with its size in bytes read from absolute ``offset``."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise SafetensorsError(f"{self.path}: ends inside a tensor's data (truncated file?)")
            done += n

    def read_into(self, key: str, out: torch.Tensor, *, start: int = 0) -> None:
        """Fill ``out`` with ``out.numel()`` elements of tensor ``key`` from flat element ``start``, converting
        the stored dtype to ``out``'s. ``out`` may live on any device; it must be contiguous."""
        info = self.info(key)
        n = out.numel()
        if start < 0 or start + n > info.numel:
            raise SafetensorsError(f"{self.path}: {key!r}: elements [{start}, {start + n}) outside its "
                                   f"{info.numel}")
        if not out.is_contiguous():
            raise ValueError("read_into needs a contiguous destination")
        offset = info.offset + start * info.dtype.itemsize
        if out.dtype == info.dtype and out.device.type == "cpu":
            self.read_bytes_into(out, offset)  # straight into the destination's storage
            return
        flat = out.view(-1)
        step = max(1, CONVERT_CHUNK_BYTES // info.dtype.itemsize)
        buffer = torch.empty(min(step, n), dtype=info.dtype)
        for first in range(0, n, step):
            chunk = buffer[: min(step, n - first)]
            self.read_bytes_into(chunk, offset + first * info.dtype.itemsize)
            flat[first:first + chunk.numel()].copy_(chunk)

    def read(self, key: str, *, dtype: torch.dtype | None = None, start: int = 0,
             shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """A new CPU tensor of ``shape`` (default: the whole tensor) read from flat element ``start``."""
        info = self.info(key)
        shape = info.shape if shape is None else shape
        out = torch.empty(shape, dtype=dtype or info.dtype)
        self.read_into(key, out, start=start)
        return out


class SafetensorsWriter:
    """Writes one safetensors file a tensor at a time: the header (every key's dtype and shape, declared up
    front) first, then each tensor's bytes as it comes, so a process never holds more than the tensor it is
    writing. The file reads with ``safetensors`` like one ``save_file`` wrote."""

    def __init__(self, path: str | os.PathLike[str], layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        codes = {v: k for k, v in DTYPES.items()}
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        self._pending: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        begin = 0
        for key, dtype, shape in layout:
            if dtype not in codes:
                raise ValueError(f"{path}: {key!r} has dtype {dtype}, which safetensors does not store")
            end = begin + math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [begin, end]}
            self._pending.append((key, dtype, tuple(shape)))
            begin = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pending.reverse()
        self._write(len(raw).to_bytes(8, "little") + raw)

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """The next tensor, in the declared order, with its declared dtype and shape."""
        if not self._pending:
            raise ValueError(f"{self.path}: {key!r} written after every declared tensor")
        want_key, dtype, shape = self._pending.pop()
        if (key, tensor.dtype, tuple(tensor.shape)) != (want_key, dtype, shape):
            raise ValueError(f"{self.path}: expected {want_key!r} {dtype} {list(shape)} next, got {key!r} "
                             f"{tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
        if data.numel():
            self._write(memoryview(data.numpy()))  # type: ignore[arg-type]

    def abort(self) -> None:
        """Close without the checks (the write failed; the caller discards the file)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        """Check every declared tensor was written, flush to disk and close."""
        if self._fd < 0:
            return
        try:
            if self._pending:
                raise ValueError(f"{self.path}: {len(self._pending)} declared tensor(s) never written, first "
                                 f"{self._pending[-1][0]!r}")
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1


def _parse_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path}: header length {n} does not fit the file ({size} bytes); "
                                   "not a safetensors file?")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not JSON ({e}); not a safetensors file?") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path}: header entry {key!r} is malformed ({e})") from e
        if code not in DTYPES:
            raise SafetensorsError(f"{path}: {key!r} has dtype {code!r}, which this loader does not read "
                                   f"(known: {', '.join(DTYPES)})")
        info = TensorInfo(DTYPES[code], shape, data_start + int(begin))
        if int(end) - int(begin) != info.nbytes or data_start + int(end) > size:
            raise SafetensorsError(f"{path}: {key!r} ({code}, shape {list(shape)}) has data_offsets "
                                   f"[{begin}, {end}) that do not match its size or the file's ({size} bytes)")
        tensors[key] = info
    return tensors, metadata


__all__ = ["CONVERT_CHUNK_BYTES", "DTYPES", "SafetensorsError", "SafetensorsFile", "SafetensorsWriter",
           "TensorInfo"]
