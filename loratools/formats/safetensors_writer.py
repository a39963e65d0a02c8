"""Write a safetensors file one tensor at a time, so a merge never holds a whole shard.

The header (names, dtypes, shapes, offsets) is known before any data is, so it is written first
and the tensors' bytes follow in header order, each as one or more chunks. The chunks are written
by a background thread: the caller computes the next block while the last one is being copied
into the page cache (file writes release the GIL). Buffers the caller fills come from a small
ring of reusable slots, so memory use is a few blocks whatever the file size, and no byte is
copied in user space on its way to the file. A slot gathers consecutive chunks (of one tensor or
of several small ones) until it is full, and only then goes to the thread: each handoff wakes a
thread, which cost more than the small tensors of an MoE model take to compute.
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
    SLOT_BYTES = 4 << 20  # chunks gathered into a slot before it is queued

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
        self._open, self._fill = None, 0  # the slot being filled, and how many of its bytes are filled
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
        if self._open is not None and self._open.size - self._fill >= nbytes:
            return self._open[self._fill: self._fill + nbytes]
        self._queue_open()
        slot = self._free.get()
        if slot is None or slot.size < nbytes:
            slot = self._allocate(max(nbytes, self.SLOT_BYTES))
        self._open, self._fill = slot, 0
        return slot[:nbytes]

    def write(self, data, *, slot: bool = False, ready=None) -> None:
        """Queue the next chunk of the current tensor: anything with the buffer protocol (a
        memory map's view: written straight from the page cache), or with `slot=True` the
        array last returned by `buffer()`. `ready`: an event (e.g. a CUDA event) to wait for
        before the bytes are read."""
        data = memoryview(data).cast("B")
        self._take(data.nbytes)
        if slot:  # the array buffer() returned: the next bytes of the open slot
            self._fill += data.nbytes
            if ready is not None or self._fill == self._open.size:
                self._queue_open(ready)
            return
        self._queue_open()  # bytes go to the file in the order they were written
        self._put(data, None, ready)

    def copy(self, src_fd: int, offset: int, nbytes: int) -> None:
        """Queue the next chunk as `nbytes` of the file `src_fd` from `offset`, copied in the
        kernel (copy_file_range) where it can be: they never enter this process."""
        self._take(nbytes)
        self._queue_open()
        self._put(_FileRange(src_fd, offset, nbytes), None, None)

    def close(self) -> None:
        self._check_done()
        if self._index + 1 != len(self._expected):
            self.abort()
            raise LoraToolsError(f"internal: {len(self._expected) - self._index - 1} tensors were never written")
        self._queue_open()
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

    def _queue_open(self, ready=None) -> None:
        """Hand the open slot's filled bytes to the writer thread (an empty one goes back to the free ones)."""
        if self._open is None:
            return
        slot, filled = self._open, self._fill
        self._open, self._fill = None, 0
        if filled:
            self._put(memoryview(slot[:filled]).cast("B"), slot, ready)
        else:
            self._free.put(slot)

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

