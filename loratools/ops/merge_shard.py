"""Merge one shard: stream a base safetensors file into its merged copy.

The base is read through a memory map, so its bytes go from the page cache straight into the
arithmetic (no read into a buffer first). Tensors the adapter does not touch are written from
the map itself; touched ones are computed block by block into small reusable buffers that a
background thread writes while the next block is computed (see StreamingSafetensorsWriter).

On a CUDA device, each tensor is staged through pinned host memory and copied asynchronously,
rounded on the device, and copied back into a pinned buffer the writer thread waits for: the
device computes one tensor while the host stages the next and the writer stores the last.
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..errors import LoraToolsError
from ..formats.safetensors_header import FLOAT_DTYPES
from ..formats.safetensors_writer import StreamingSafetensorsWriter
from ..formats.torch_dtypes import TORCH_DTYPES
from .merge_math import apply_ops
from .merge_plan import MergePlan

CHUNK_BYTES = 1 << 20  # output rows rounded, checked and queued per step: stays in cache
PAGE = mmap.PAGESIZE


def out_entries(plan: MergePlan, shard: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, output dtype code, shape) for every tensor of a shard, in file order."""
    header = plan.base.shards[shard]
    names = sorted(header.tensors, key=lambda n: header.tensors[n].start)  # sequential reads
    entries = []
    for name in names:
        info = header.tensors[name]
        dtype = plan.out_dtype if plan.out_dtype and info.dtype in FLOAT_DTYPES else info.dtype
        entries.append((name, dtype, info.shape))
    return entries


def write_shard(plan: MergePlan, src: Path, shard: str, dst: Path, dev: torch.device,
                progress: Callable[[int], None] | None = None) -> int:
    """Write the merged `shard` of the base (file `src`) to `dst`; returns the bytes written."""
    header = plan.base.shards[shard]
    entries = out_entries(plan, shard)
    header.check_unchanged()  # the map below must be of the file the plan was made from
    on_device = dev.type != "cpu"
    with open(src, "rb") as fin, open(dst, "wb", buffering=0) as fout:
        mapping = mmap.mmap(fin.fileno(), 0, access=mmap.ACCESS_READ)
        writer = StreamingSafetensorsWriter(fout, entries, header.metadata or {"format": "pt"}, pin_memory=on_device)
        checks = _FiniteChecks()
        try:
            source = _SourceMap(mapping, header.data_start)
            stager = _DeviceStager(dev) if on_device else None
            for i, (name, dtype, shape) in enumerate(entries):
                info = header.tensors[name]
                if i + 1 < len(entries):
                    source.prefetch(header.tensors[entries[i + 1][0]])
                writer.begin(name)
                ops = plan.ops.get(name)
                if ops is None and dtype == info.dtype:
                    writer.write(source.bytes(info))  # straight from the page cache
                else:
                    base = source.tensor(info, TORCH_DTYPES[info.dtype])
                    if stager is not None:
                        base = stager.to_device(base)
                    out = _TensorOutput(writer, name, TORCH_DTYPES[dtype], shape, checks)
                    if ops is None:
                        out.store(base)
                    else:
                        apply_ops(plan, ops, base, out, dev)
                    out.finish()
                    del base
                source.release(info)
                if progress:
                    progress(info.end - info.start)
            writer.close()
            checks.verify()
        except BaseException:
            writer.abort()
            raise
        finally:
            source = stager = None  # drop every view of the map before closing it
            try:
                mapping.close()
            except BufferError:  # a view is still referenced (an exception's frames): the GC will close it
                pass
        return fout.tell()


class _SourceMap:
    """Tensors of a safetensors file as views of its memory map (no copy). Pages are prefetched
    one tensor ahead and unmapped behind (they stay in the page cache; the process's RSS stays
    near a tensor instead of growing to the whole shard)."""

    def __init__(self, mapping: mmap.mmap, data_start: int):
        self.mapping, self.data_start = mapping, data_start
        with warnings.catch_warnings():  # the map is read-only; nothing writes through this view
            warnings.simplefilter("ignore")
            self.all = torch.frombuffer(mapping, dtype=torch.uint8) if len(mapping) else torch.empty(0, dtype=torch.uint8)
        self.released = 0
        if hasattr(mmap, "MADV_SEQUENTIAL"):
            mapping.madvise(mmap.MADV_SEQUENTIAL)

    def bytes(self, info) -> memoryview:
        return memoryview(self.mapping)[self.data_start + info.start: self.data_start + info.end]

    def tensor(self, info, dtype: torch.dtype) -> torch.Tensor:
        start = self.data_start + info.start
        raw = self.all[start: self.data_start + info.end]
        if start % dtype.itemsize:  # torch views need aligned data; other writers may not align
            raw = raw.clone()
        return raw.view(dtype).view(info.shape)

    def prefetch(self, info) -> None:
        start = (self.data_start + info.start) // PAGE * PAGE
        if hasattr(mmap, "MADV_WILLNEED") and info.end > info.start:
            self.mapping.madvise(mmap.MADV_WILLNEED, start, self.data_start + info.end - start)

    def release(self, info) -> None:
        end = (self.data_start + info.end) // PAGE * PAGE
        if hasattr(mmap, "MADV_DONTNEED") and end > self.released:
            self.mapping.madvise(mmap.MADV_DONTNEED, self.released, end - self.released)
            self.released = end


class _FiniteChecks:
    """NaN/Inf checks of the rounded output. On CPU each chunk is checked at once, while it is in
    cache; on a device the (min, max) pairs are kept there and read back once per shard, so the
    host never waits for the device in between."""

    def __init__(self):
        self.pending: list[tuple[str, torch.Tensor]] = []

    def check(self, name: str, values: torch.Tensor) -> None:
        if not values.is_floating_point() or values.numel() == 0:
            return
        # min and max propagate NaN and show ±Inf: one fast reduction (isfinite is ~15x slower)
        low_high = torch.stack(torch.aminmax(values)).float()
        if values.device.type == "cpu":
            self._verify(name, low_high.tolist(), values.dtype)
        else:
            self.pending.append((name, low_high))

    def verify(self) -> None:
        for name, low_high in self.pending:
            self._verify(name, low_high.tolist(), None)
        self.pending.clear()

    @staticmethod
    def _verify(name: str, low_high: list[float], dtype) -> None:
        if not all(math.isfinite(v) for v in low_high):
            what = f" (overflows {str(dtype)[6:]}?)" if dtype is not None else " (overflows the output dtype?)"
            raise LoraToolsError(f"merged {name} is not finite{what}; nothing was written", code="non-finite")


class _TensorOutput:
    """One output tensor, streamed: `store(value)` takes its rows in order (the whole tensor or
    successive row blocks), rounds them into the output dtype inside a writer buffer, checks
    them, and queues them for writing."""

    def __init__(self, writer: StreamingSafetensorsWriter, name: str, dtype: torch.dtype, shape, checks: _FiniteChecks):
        self.writer, self.name, self.dtype, self.shape, self.checks = writer, name, dtype, tuple(shape), checks
        self.rows_done = 0

    def store(self, value: torch.Tensor) -> None:
        rows = value.reshape(-1, 1) if value.dim() < 2 else value  # a bias or scalar: one element a row
        if rows.numel() == 0:
            self.rows_done += rows.shape[0]
            return
        if value.device.type != "cpu":
            self._store_from_device(rows)
            return
        row_bytes = self.dtype.itemsize * max(1, math.prod(rows.shape[1:]))
        step = max(1, CHUNK_BYTES // row_bytes)
        for start in range(0, rows.shape[0], step):
            chunk = rows[start: start + step]
            target = self.writer.buffer(chunk.shape[0] * row_bytes).view(self.dtype).view(chunk.shape)
            target.copy_(chunk)
            self.checks.check(self.name, target)
            self.writer.write(target.view(torch.uint8).reshape(-1), slot=True)
        self.rows_done += rows.shape[0]

    def _store_from_device(self, rows: torch.Tensor) -> None:
        rounded = rows.to(self.dtype)  # rounded on the device: a quarter of the bytes to move back
        self.checks.check(self.name, rounded)
        nbytes = rounded.numel() * self.dtype.itemsize
        target = self.writer.buffer(nbytes).view(self.dtype).view(rounded.shape)  # pinned
        target.copy_(rounded, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.writer.write(target.view(torch.uint8).reshape(-1), slot=True, ready=done)
        self.rows_done += rows.shape[0]

    def finish(self) -> None:
        expected = self.shape[0] if len(self.shape) >= 2 else max(1, math.prod(self.shape))
        if self.rows_done != expected and math.prod(self.shape):
            raise LoraToolsError(f"internal: {self.name} got {self.rows_done} of {expected} rows")


class _DeviceStager:
    """Host → device copies through two pinned buffers, asynchronous: the copy of one tensor
    overlaps the device's work on the previous one. A buffer is reused only once the copy out of
    it has completed (its event)."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.slots: list[list] = [[None, None], [None, None]]  # [pinned uint8 buffer, event of its last copy]
        self.turn = 0

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        slot = self.slots[self.turn]
        self.turn ^= 1
        if slot[1] is not None:
            slot[1].synchronize()
        nbytes = host.numel() * host.element_size()
        if slot[0] is None or slot[0].numel() < nbytes:
            slot[0] = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        staged = slot[0][:nbytes].view(host.dtype).view(host.shape)
        staged.copy_(host)
        on_device = staged.to(self.dev, non_blocking=True)
        if self.dev.type == "cuda":
            slot[1] = torch.cuda.Event()
            slot[1].record()
        return on_device
