"""Merge one shard: stream a base safetensors file into its merged copy.

The base is read through a memory map, so its bytes go from the page cache straight into the
arithmetic (no read into a buffer first). Tensors the adapter does not touch are copied in
the kernel (copy_file_range); touched ones are computed block by block into small reusable buffers that a
background thread writes while the next block is computed (see StreamingSafetensorsWriter).
Plain LoRA on CPU is merged with numpy (kernel_numpy.py); torch is imported only for what needs
it (kernel_torch.py: DoRA, KaSA, replaced rows, lora_bias, other dtypes, a GPU).

A quantized weight (formats/quantized.py) is dequantized (dequant.py: bnb into its quant
state's dtype, bit for bit as bitsandbytes does; FP8 into float32) and merged from there; its
scales and code maps are not written. With `keep_quantized` (FP8), a changed
weight is quantized again and written with its new scales; unchanged ones are copied as stored.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Callable

import numpy as np

from ...formats.safetensors_writer import StreamingSafetensorsWriter
from .. import dequant
from . import kernel_numpy
from .plan import MergePlan, TensorOps

PAGE = mmap.PAGESIZE


def out_entries(plan: MergePlan, shard: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, output dtype code, shape) for every tensor of a shard, in file order (as planned)."""
    return [(out.name, out.dtype, out.shape) for out in plan.outputs[shard]]


def _dequantizes(plan: MergePlan, name: str) -> bool:
    """Whether this tensor is read by dequantizing it (else: its stored bytes are the values)."""
    return name in plan.base.quantized and (not plan.keep_quantized or name in plan.ops)


def needs_torch(plan: MergePlan, device: str) -> bool:
    """Whether merging this plan on `device` uses torch for some tensor (a parent process
    imports it once, before its workers fork, rather than each worker importing it)."""
    if device != "cpu":
        return True
    for shard, outputs in plan.outputs.items():
        for out in outputs:
            ops, dtype, shape = plan.ops.get(out.name), out.dtype, out.shape
            if _dequantizes(plan, out.name):
                if ops is None:
                    continue  # stored as dequantized, or rounded by kernel_numpy.store
                in_dtype = dequant.value_dtype(plan.base.quantized[out.name])
                dtype = "F32" if plan.keep_quantized else dtype  # merged in float32, then quantized again
            else:
                in_dtype = plan.base.shards[shard].tensors[out.source].dtype
            if (ops is None and dtype != in_dtype) or (ops is not None and not kernel_numpy.handles(ops, in_dtype, dtype, shape)):
                return True
    return False


def write_shard(plan: MergePlan, src: Path, shard: str, dst: Path, device: str = "cpu",
                progress: Callable[[int], None] | None = None) -> int:
    """Write the merged `shard` of the base (file `src`) to `dst`; returns the bytes written.
    device: "cpu" or a torch device string."""
    header = plan.base.shards[shard]
    outputs = plan.outputs[shard]
    header.check_unchanged()  # the map below must be of the file the plan was made from
    with open(src, "rb") as fin, open(dst, "wb", buffering=0) as fout:
        source = _SourceMap(fin.fileno(), header.data_start)
        torch_state = _TorchState(device)
        writer = StreamingSafetensorsWriter(fout, out_entries(plan, shard), header.metadata or {"format": "pt"},
                                            allocate=torch_state.allocator())
        work = kernel_numpy.Workspace()
        requantized: dict[str, np.ndarray] = {}  # keep_quantized: a changed weight's other part, until written
        requantized_by = _requantized_by(plan)
        try:
            for i, out in enumerate(outputs):
                name, dtype, shape, info = out.name, out.dtype, out.shape, header.tensors[out.source]
                if i + 1 < len(outputs):
                    source.prefetch(header.tensors[outputs[i + 1].source])
                writer.begin(name)
                ops = plan.ops.get(name)
                requantize = requantized_by.get(name)
                if name in requantized:
                    writer.write(requantized.pop(name))
                elif requantize is not None:
                    requantized.update(_requantize(plan, requantize, source, work, torch_state))
                    writer.write(requantized.pop(name))
                elif _dequantizes(plan, name):
                    values, held = _dequantize(plan, name, source)
                    if ops is None and held == dtype:  # bnb's own dtype: written as dequantized
                        writer.write(values)
                    elif ops is None:
                        kernel_numpy.store(values, held, dtype, writer, name, work)
                    else:
                        _merge_tensor(plan, ops, values.reshape(-1).view(np.uint8), held, dtype, shape, writer, name, work, torch_state)
                elif ops is None and dtype == info.dtype:  # copied in the kernel, page cache to page cache
                    writer.copy(fin.fileno(), header.data_start + info.start, info.end - info.start)
                else:
                    _merge_tensor(plan, ops, source.bytes(info), info.dtype, dtype, shape, writer, name, work, torch_state)
                source.release(info)
                if progress and name == out.source:  # an untied head is its embedding read again
                    progress(info.end - info.start)
            writer.close()
            torch_state.verify()
        except BaseException:
            writer.abort()
            raise
        finally:
            source.close()
        return fout.tell()


def _dequantize(plan: MergePlan, name: str, source: "_SourceMap") -> tuple[np.ndarray, str]:
    """The values of a quantized weight and the dtype code they are held in."""
    weight = plan.base.quantized[name]
    stored = np.frombuffer(source.bytes(plan.base.shards[plan.base.weight_map[name]].tensors[name]), dtype=np.uint8)
    return dequant.dequantize(weight, stored, dequant.read_parts(plan.base, weight)), dequant.value_dtype(weight)


def _requantized_by(plan: MergePlan) -> dict[str, str]:
    """keep_quantized: every stored tensor of a changed quantized weight -> that weight."""
    if not plan.keep_quantized:
        return {}
    out = {}
    for name in plan.ops:
        if name in plan.base.quantized:
            out.update({part: name for part in plan.base.quantized[name].parts.values()})
            out[name] = name
    return out


def _requantize(plan: MergePlan, name: str, source: "_SourceMap", work, torch_state) -> dict[str, np.ndarray]:
    """A changed FP8 weight, merged in float32 and quantized again: {tensor name: bytes} for the
    weight and its new scales (plan_merge checked both are in this shard)."""
    weight = plan.base.quantized[name]
    merged = _ArrayWriter(weight.shape)
    values, held = _dequantize(plan, name, source)
    _merge_tensor(plan, plan.ops[name], values.reshape(-1).view(np.uint8), held, "F32", weight.shape, merged, name, work, torch_state)
    torch_state.verify()
    codes, scale_inv = dequant.quantize_fp8(merged.array, weight.block)
    return {name: codes.reshape(-1), weight.parts["scale_inv"]: scale_inv.reshape(-1).view(np.uint8)}


class _ArrayWriter:
    """The writer interface of StreamingSafetensorsWriter, into one float32 array in memory."""

    def __init__(self, shape: tuple[int, ...]):
        self.array = np.empty(shape, dtype=np.float32)
        self.bytes, self.position = self.array.reshape(-1).view(np.uint8), 0

    def buffer(self, nbytes: int) -> np.ndarray:
        return self.bytes[self.position: self.position + nbytes]

    def write(self, data: np.ndarray, *, slot: bool = False, ready=None) -> None:
        if ready is not None:
            ready.synchronize()
        self.position += data.nbytes


def _merge_tensor(plan: MergePlan, ops: TensorOps | None, raw: memoryview, in_dtype: str, out_dtype: str,
                  shape: tuple[int, ...], writer: StreamingSafetensorsWriter, name: str, work, torch_state) -> None:
    if torch_state.device == "cpu" and ops is not None and kernel_numpy.handles(ops, in_dtype, out_dtype, shape):
        stored = np.dtype(kernel_numpy.DTYPES[in_dtype])
        flat = np.frombuffer(raw, dtype=np.uint8)
        if flat.ctypes.data % stored.itemsize:  # other writers need not align tensors: copy this one
            flat = flat.copy()
        base = flat.view(stored).reshape(shape)
        kernel_numpy.merge_tensor(plan, ops, base, in_dtype, out_dtype, writer, name, work)
    else:
        torch_state.merge(plan, ops, np.frombuffer(raw, dtype=np.uint8), in_dtype, out_dtype, shape, writer, name)


class _TorchState:
    """merge_torch, imported on first use (plain LoRA on CPU never needs it)."""

    def __init__(self, device: str):
        self.device = device
        self._state = None

    def _module(self):
        from . import kernel_torch

        if self._state is None:
            import torch

            self._state = kernel_torch.DeviceState(torch.device(self.device))
        return kernel_torch

    def allocator(self):
        if self.device == "cpu":
            return None
        import torch

        return self._module().DeviceState.allocator(torch.device(self.device))

    def merge(self, plan, ops, raw, in_dtype, out_dtype, shape, writer, name) -> None:
        import torch

        self._module().merge_tensor(plan, ops, raw, in_dtype, out_dtype, shape, writer, name, torch.device(self.device), self._state)

    def verify(self) -> None:
        if self._state is not None:
            self._state.verify()


class _SourceMap:
    """Tensors of a safetensors file as views of its memory map (no copy). Pages are prefetched
    one tensor ahead and unmapped behind (they stay in the page cache; the process's RSS stays
    near a tensor instead of growing to the whole shard)."""

    def __init__(self, fileno: int, data_start: int):
        self.mapping = mmap.mmap(fileno, 0, access=mmap.ACCESS_READ)
        self.view = memoryview(self.mapping)
        self.data_start, self.released = data_start, 0
        if hasattr(mmap, "MADV_SEQUENTIAL"):
            self.mapping.madvise(mmap.MADV_SEQUENTIAL)

    def bytes(self, info) -> memoryview:
        return self.view[self.data_start + info.start: self.data_start + info.end]

    def prefetch(self, info) -> None:
        start = (self.data_start + info.start) // PAGE * PAGE
        if hasattr(mmap, "MADV_WILLNEED") and info.end > info.start:
            self.mapping.madvise(mmap.MADV_WILLNEED, start, self.data_start + info.end - start)

    def release(self, info) -> None:
        end = (self.data_start + info.end) // PAGE * PAGE
        if hasattr(mmap, "MADV_DONTNEED") and end > self.released:
            self.mapping.madvise(mmap.MADV_DONTNEED, self.released, end - self.released)
            self.released = end

    def close(self) -> None:
        try:
            self.view.release()
            self.mapping.close()
        except BufferError:  # a view is still referenced (an exception's frames): the GC will close it
            pass
