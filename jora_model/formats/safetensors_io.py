"""Safetensors files read slice by slice and written tensor by tensor.

We read and write the format ourselves (an 8-byte little-endian header length, a JSON header, then
raw little-endian bytes) because the `safetensors` package cannot hand numpy a bfloat16 tensor and
cannot write a file without holding all of its tensors at once. Reading maps the file and copies only
the requested slice, so a device can be given its shard of a 70B tensor without the rest being read.
Files written here are checked against the `safetensors` package in the tests.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from pathlib import Path
from typing import Iterable, Sequence

import ml_dtypes
import numpy as np

from jora_model.errors import JoraError

DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
assert sys.byteorder == "little", "safetensors is little-endian; big-endian hosts are not supported"


def row_blocks(array: np.ndarray, block_bytes: int = 16 * 1024 * 1024):
    """Views of consecutive leading-axis slices of about `block_bytes` each."""
    if array.ndim == 0 or array.shape[0] == 0:
        yield array
        return
    row_bytes = max(1, array.nbytes // array.shape[0])
    step = max(1, block_bytes // row_bytes)
    for start in range(0, array.shape[0], step):
        yield array[start:start + step]


def dtype_name(dtype: np.dtype | type) -> str:
    try:
        return DTYPE_NAMES[np.dtype(dtype)]
    except KeyError:
        raise JoraError(f"dtype {np.dtype(dtype)} cannot be stored in safetensors") from None


class SafetensorsFile:
    """One safetensors file, memory-mapped; `read(name, index)` copies out just that slice."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise JoraError("truncated safetensors file (no header)", self.path)
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise JoraError("corrupt safetensors header length", self.path)
                header = json.loads(f.read(header_len))
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        except FileNotFoundError:
            raise JoraError("file not found", self.path) from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise JoraError("corrupt safetensors header (not JSON)", self.path) from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._base = 8 + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        data_size = size - self._base
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                start, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise JoraError(f"corrupt header entry for tensor {name!r}", self.path) from None
            if end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)) or end > data_size:
                raise JoraError(f"tensor {name!r} runs past the end of the file (truncated?)", self.path)
            self._entries[name] = (dtype, shape, start, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0]

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise JoraError(f"tensor {name!r} not found", self.path) from None

    def view(self, name: str) -> np.ndarray:
        """A read-only array backed by the mapping: nothing is read until it is indexed."""
        dtype, shape, start, end = self._entry(name)
        if self._mmap is None or start == end:
            return np.zeros(shape, dtype)
        return np.frombuffer(self._mmap, dtype=dtype, count=(end - start) // dtype.itemsize,
                             offset=self._base + start).reshape(shape)

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """Copy out `name[index]` (all of it when index is None); only the touched pages are read."""
        view = self.view(name)
        return np.array(view if index is None else view[index], copy=True)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view is still alive; the mapping goes when it does
                pass
            self._mmap = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PlannedWriter:
    """Writes one safetensors file whose tensors' names, dtypes and shapes are known up front.

    The header goes first, then each tensor is written into its place as it arrives, so at most one
    tensor is held in memory. `close()` fails if a planned tensor was never written.
    """

    def __init__(self, path: str | Path, plan: Sequence[tuple[str, np.dtype, Sequence[int]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": dict(metadata or {})}
        self._slots: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        offset = 0
        for name, dtype, shape in plan:
            dtype, shape = np.dtype(dtype), tuple(int(d) for d in shape)
            nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": dtype_name(dtype), "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._slots[name] = (dtype, shape, offset)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
        self._base = 8 + len(raw)
        self._written: set[str] = set()
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file.truncate(self._base + offset)

    def write(self, name: str, array: np.ndarray) -> None:
        dtype, shape, offset = self._slots[name]
        if tuple(array.shape) != shape:
            raise JoraError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {shape}", self.path)
        self._file.seek(self._base + offset)
        # Cast and lay out about 16 MiB of rows at a time: a transposed or differently typed input
        # never costs a second whole-tensor copy.
        for block in row_blocks(array):
            self._file.write(np.ascontiguousarray(block, dtype=dtype).reshape(-1).view(np.uint8).data)
        self._written.add(name)

    def close(self) -> None:
        missing = set(self._slots) - self._written
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if missing:
            raise JoraError(f"tensors never written: {', '.join(sorted(missing))}", self.path)


def save_file(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write small tensors in one go (adapters, tests)."""
    writer = PlannedWriter(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], metadata)
    for name, array in tensors.items():
        writer.write(name, array)
    writer.close()


def plan_shards(entries: Iterable[tuple[str, np.dtype, Sequence[int]]], max_bytes: int
                ) -> list[list[tuple[str, np.dtype, tuple[int, ...]]]]:
    """Group tensors, in order, into files of at most `max_bytes` (a larger tensor gets its own file)."""
    shards: list[list[tuple[str, np.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dtype, shape in entries:
        nbytes = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, np.dtype(dtype), tuple(shape)))
        size += nbytes
    return [s for s in shards if s]
