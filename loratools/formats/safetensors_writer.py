"""Write a safetensors file one tensor at a time, so a merge never holds a whole shard.

The header (names, dtypes, shapes, offsets) is known before any data is, so it is written first
and the tensors' bytes follow in header order, each as one or more chunks. The chunks are written
by a background thread: the caller computes the next block while the last one is being copied
into the page cache (file writes release the GIL). Buffers the caller fills come from a small
ring of reusable slots, so memory use is a few blocks whatever the file size, and no byte is
copied in user space on its way to the file.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from typing import BinaryIO, Callable

import numpy as np

from ..errors import FormatError, LoraToolsError
from .atomic import preallocate, write_all
from .dtypes import DTYPES


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of this dtype code and shape."""
    size = DTYPES[dtype].size
    for d in shape:
        size *= d
    return size


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> tuple[bytes, list[int]]:
    """The header of a file holding `entries` (name, dtype code, shape) in that order, and each
    entry's size in bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset, sizes = 0, []
    for name, dtype, shape in entries:
        size = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        sizes.append(size)
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(blob)) + blob, sizes


class StreamingSafetensorsWriter:
    """`begin(name)` each tensor in header order, then `write` its bytes in chunks; `close()`
    waits for the last write and checks every tensor got exactly its size."""

    SLOTS = 3  # one being filled, one queued, one being written

    def __init__(self, fh: BinaryIO, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None,
                 *, allocate: Callable[[int], "np.ndarray"] | None = None):
        """allocate(nbytes): a uint8 array for a buffer slot (e.g. pinned memory for a GPU);
        plain numpy memory by default."""
        blob, sizes = encode_header(entries, metadata)
        if hasattr(fh, "fileno"):
            preallocate(fh.fileno(), len(blob) + sum(sizes), getattr(fh, "name", "output"))
        self._expected = [(name, size) for (name, _, _), size in zip(entries, sizes)]
        self._index, self._left = -1, 0
        self._fh = fh
        self._allocate = allocate or (lambda n: np.empty(n, dtype=np.uint8))
        self._queue: queue.Queue = queue.Queue(maxsize=self.SLOTS)
        self._free: queue.Queue = queue.Queue()
        for _ in range(self.SLOTS):
            self._free.put(None)  # a slot, allocated on first use
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="safetensors-writer", daemon=True)
        self._thread.start()
        self._put(memoryview(blob), None, None)

    # ---- the caller's side --------------------------------------------------------------

    def begin(self, name: str) -> int:
        """Start the next tensor; returns its size in bytes."""
        self._check_done()
        self._index += 1
        if self._index >= len(self._expected) or self._expected[self._index][0] != name:
            due = self._expected[self._index][0] if self._index < len(self._expected) else "nothing"
            raise LoraToolsError(f"internal: began {name} where {due} was due")
        self._left = self._expected[self._index][1]
        return self._left

    def buffer(self, nbytes: int) -> "np.ndarray":
        """A uint8 array of `nbytes` to fill and hand back with `write(..., slot=True)`. Blocks
        while every slot is still queued or being written."""
        self._raise_pending()
        slot = self._free.get()
        if slot is None or slot.size < nbytes:
            slot = self._allocate(max(nbytes, 1))
        self._slot = slot
        return slot[:nbytes]

    def write(self, data, *, slot: bool = False, ready=None) -> None:
        """Queue the next chunk of the current tensor: anything with the buffer protocol (a
        memory map's view: written straight from the page cache), or with `slot=True` the
        array last returned by `buffer()`. `ready`: an event (e.g. a CUDA event) to wait for
        before the bytes are read."""
        data = memoryview(data).cast("B")
        self._take(data.nbytes)
        self._put(data, self._slot if slot else None, ready)

    def copy(self, src_fd: int, offset: int, nbytes: int) -> None:
        """Queue the next chunk as `nbytes` of the file `src_fd` from `offset`, copied in the
        kernel (copy_file_range) where it can be: they never enter this process."""
        self._take(nbytes)
        self._put(_FileRange(src_fd, offset, nbytes), None, None)

    def close(self) -> None:
        self._check_done()
        if self._index + 1 != len(self._expected):
            self.abort()
            raise LoraToolsError(f"internal: {len(self._expected) - self._index - 1} tensors were never written")
        self._queue.put(None)
        self._thread.join()
        self._raise_pending()

    def abort(self) -> None:
        """Stop writing (the file is being thrown away): drop what is queued, end the thread."""
        self._error = self._error or LoraToolsError("aborted")
        self._queue.put(None)
        self._thread.join()

    def _take(self, nbytes: int) -> None:
        """Count `nbytes` more of the current tensor."""
        if nbytes > self._left:
            raise LoraToolsError(f"internal: {self._expected[self._index][0]} got more than its {self._expected[self._index][1]} bytes")
        self._left -= nbytes

    def _check_done(self) -> None:
        if self._index >= 0 and self._left:
            name, size = self._expected[self._index]
            raise LoraToolsError(f"internal: {name} got {size - self._left} of its {size} bytes")

    def _put(self, data, owner, ready) -> None:
        self._raise_pending()
        self._queue.put((data, owner, ready))

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, LoraToolsError("aborted")
            raise error

    # ---- the writer thread --------------------------------------------------------------

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            data, owner, ready = item
            try:
                if self._error is None:
                    if ready is not None:
                        ready.synchronize()
                    if isinstance(data, _FileRange):
                        data.copy_to(self._fh)
                        continue
                    write_all(self._fh.fileno(), data)
            except BaseException as exc:  # reported to the caller at its next call
                self._error = exc
            finally:
                if owner is not None:
                    self._free.put(owner)


class _FileRange:
    def __init__(self, fd: int, offset: int, nbytes: int):
        self.fd, self.offset, self.nbytes = fd, offset, nbytes

    def copy_to(self, out) -> None:
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < self.nbytes:
                    n = os.copy_file_range(self.fd, out.fileno(), self.nbytes - done, self.offset + done)
                    if n == 0:
                        break
                    done += n
            except OSError:  # not across these filesystems: read and write instead
                pass
        while done < self.nbytes:
            block = os.pread(self.fd, min(16 << 20, self.nbytes - done), self.offset + done)
            if not block:
                raise FormatError("a base shard ended early while being copied (truncated meanwhile?); nothing was written", code="input-changed")
            write_all(out.fileno(), block)
            done += len(block)

