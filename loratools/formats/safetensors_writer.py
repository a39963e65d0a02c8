"""Write a safetensors file one tensor at a time, so a merge never holds a whole shard.

The header (names, dtypes, shapes, offsets) is known before any data is, so it is written first
and the tensors' bytes follow in header order. Memory use is one tensor, whatever the file size.
"""

from __future__ import annotations

import json
import os
import struct
from typing import BinaryIO

from ..errors import LoraToolsError
from .safetensors_header import DTYPES

COPY_CHUNK = 16 << 20


class StreamingSafetensorsWriter:
    def __init__(self, fh: BinaryIO, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None):
        """entries: (name, dtype code such as "BF16", shape), in the order they will be written."""
        self._fh = fh
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        self._expected: list[tuple[str, int]] = []
        for name, dtype, shape in entries:
            size = DTYPES[dtype][0]
            for d in shape:
                size *= d
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._expected.append((name, size))
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        self._next = 0

    def write(self, name: str, data) -> None:
        """Append the raw bytes of the next tensor (anything supporting the buffer protocol)."""
        expected_name, size = self._expected[self._next]
        view = memoryview(data).cast("B")
        if name != expected_name or view.nbytes != size:
            raise LoraToolsError(f"internal: wrote {name} ({view.nbytes} B) where {expected_name} ({size} B) was due")
        self._fh.write(view)
        self._next += 1

    def copy_from(self, name: str, src: BinaryIO, start: int) -> None:
        """Append the next tensor by copying its bytes from an open file at `start`, in the
        kernel where it can (copy_file_range), so the bytes never pass through Python."""
        expected_name, size = self._expected[self._next]
        if name != expected_name:
            raise LoraToolsError(f"internal: copied {name} where {expected_name} was due")
        self._fh.flush()
        copied = 0
        if hasattr(os, "copy_file_range"):
            try:
                while copied < size:
                    n = os.copy_file_range(src.fileno(), self._fh.fileno(), size - copied, start + copied)
                    if n == 0:
                        break
                    copied += n
                # copy_file_range moved the file position of the output; keep the Python object in step
                self._fh.seek(0, os.SEEK_END)
            except OSError:  # e.g. not supported across these filesystems: fall back to read/write
                self._fh.seek(0, os.SEEK_END)
        src.seek(start + copied)
        remaining = size - copied
        while remaining:
            block = src.read(min(COPY_CHUNK, remaining))
            if not block:
                raise LoraToolsError(f"{getattr(src, 'name', 'input')}: ended early while copying {name}")
            self._fh.write(block)
            remaining -= len(block)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            raise LoraToolsError(f"internal: {len(self._expected) - self._next} tensors were never written")
