"""Merge one shard: stream a base safetensors file into its merged copy.

The base is read through a memory map, so its bytes go from the page cache straight into the
arithmetic (no read into a buffer first). Tensors the adapter does not touch are copied in
the kernel (copy_file_range); touched ones are computed block by block into small reusable buffers that a
background thread writes while the next block is computed (see StreamingSafetensorsWriter).
Plain LoRA on CPU is merged with numpy (kernel_numpy.py); torch is imported only for what needs
it (kernel_torch.py: DoRA, KaSA, replaced rows, lora_bias, other dtypes, a GPU).

A quantized weight (formats/quantized.py) is dequantized (dequant.py: bnb into its quant
state's dtype, bit for bit as bitsandbytes does; FP8 into float32) and merged from there; its
scales and code maps are not written (MXFP4: dequant_mxfp4.py, into bf16, written under the
parameter's name where its blocks were). A bnb weight on the numpy kernel is decoded row block by
row block inside the merge's loop (dequant.BnbRows): no whole-tensor array; an MXFP4 one expert
at a time (dequant_mxfp4.Mxfp4Rows). With `keep_quantized` (FP8), a changed
weight is quantized again and written with its new scales; unchanged ones are copied as stored.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Callable

import numpy as np

from ...formats.safetensors_writer import StreamingSafetensorsWriter
from .. import dequant, dequant_mxfp4
from . import kernel_numpy
from .plan import MergePlan, OutputTensor

PAGE = mmap.PAGESIZE


def out_entries(plan: MergePlan, shard: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, output dtype code, shape) for every tensor of a shard, in file order (as planned)."""
    return [(out.name, out.dtype, out.shape) for out in plan.outputs[shard]]


def needs_torch(plan: MergePlan) -> bool:
    """Whether the plan computes some tensor with torch (a parent process imports it once,
    before its workers fork, rather than each worker importing it)."""
    return plan.device != "cpu" or any(out.kernel == "torch" for outs in plan.outputs.values() for out in outs)


def write_shard(plan: MergePlan, src: Path, shard: str, dst: Path, progress: Callable[[int], None] | None = None) -> int:
    """Write the merged `shard` of the base (file `src`) to `dst`, as the plan's output tensors
    say; returns the bytes written. Computed on plan.device ("cpu" or a torch device string)."""
    header = plan.base.shards[shard]
    outputs = plan.outputs[shard]
    header.check_unchanged()  # the map below must be of the file the plan was made from
    with open(src, "rb") as fin, open(dst, "wb", buffering=0) as fout:
        source = _SourceMap(fin.fileno(), header.data_start)
        torch_state = _TorchState(plan.device)
        writer = StreamingSafetensorsWriter(fout, out_entries(plan, shard), header.metadata or {"format": "pt"},
                                            allocate=torch_state.allocator())
        work = kernel_numpy.Workspace()
        requantized: dict[str, np.ndarray] = {}  # a changed FP8 weight's other part, until written
        try:
            for i, out in enumerate(outputs):
                info = header.tensors[out.source]
                if i + 1 < len(outputs):
                    source.prefetch(header.tensors[outputs[i + 1].source])
                writer.begin(out.name)
                if out.action == "copy":  # in the kernel, page cache to page cache
                    writer.copy(fin.fileno(), header.data_start + info.start, info.end - info.start)
                elif out.action == "requantize":
                    if out.name not in requantized:
                        requantized.update(_requantize(plan, out, source, work, torch_state))
                    writer.write(requantized.pop(out.name))
                elif out.quantized and out.kernel != "torch" and plan.base.quantized[out.quantized].scheme in ROW_SCHEMES:
                    # bnb 4-bit: decoded row block by row block inside the merge's own loop; MXFP4 expert by expert
                    rows = _quantized_rows(plan, out.quantized, source)
                    if out.action == "dequantize":  # no ΔW: into the output dtype (checked if it changes)
                        kernel_numpy.store(rows, out.dtype, writer, out.name, work, check=out.kernel is not None)
                    else:
                        kernel_numpy.merge_tensor(plan, plan.ops.get(out.name), rows, out.dtype, writer, out.name, work)
                else:
                    if out.quantized:
                        values, _ = _dequantize(plan, out.quantized, source)
                        raw = values.reshape(-1).view(np.uint8)
                    else:
                        raw = source.bytes(info)
                    if out.action == "dequantize" and out.kernel is None:  # decoded into its own dtype
                        writer.write(values)
                    elif out.action == "dequantize":
                        kernel_numpy.store(kernel_numpy.StoredRows(values, out.held), out.dtype, writer, out.name, work)
                    else:
                        _merge_tensor(plan, out, raw, writer, work, torch_state)
                source.release(info)
                if progress and out.name not in plan.untied:  # an untied head is its embedding read again
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
    stored = _stored_codes(plan, weight, source)
    if weight.scheme == "mxfp4":
        return dequant_mxfp4.dequantize(stored, dequant_mxfp4.read_scales(plan.base, weight), weight.shape), weight.dtype
    return dequant.dequantize(weight, stored, dequant.read_parts(plan.base, weight)), dequant.value_dtype(weight)


ROW_SCHEMES = (*dequant.BNB_SCHEMES, "mxfp4")  # decoded as the kernel reads them (FP8: whole)


def _quantized_rows(plan: MergePlan, name: str, source: "_SourceMap"):
    """A quantized weight as a row source of the numpy kernel (dequant.BnbRows, dequant_mxfp4.Mxfp4Rows)."""
    weight = plan.base.quantized[name]
    stored = _stored_codes(plan, weight, source)
    if weight.scheme == "mxfp4":
        return dequant_mxfp4.Mxfp4Rows(stored, dequant_mxfp4.read_scales(plan.base, weight), weight.shape)
    return dequant.bnb_rows(weight, stored, dequant.read_parts(plan.base, weight))


def _stored_codes(plan: MergePlan, weight, source: "_SourceMap") -> np.ndarray:
    """The bytes of the tensor holding a quantized weight's codes (MXFP4: its `_blocks`)."""
    info = plan.base.shards[plan.base.weight_map[weight.stored]].tensors[weight.stored]
    return np.frombuffer(source.bytes(info), dtype=np.uint8)


def _requantize(plan: MergePlan, out: OutputTensor, source: "_SourceMap", work, torch_state) -> dict[str, np.ndarray]:
    """A changed FP8 weight, merged in float32 and quantized again: {tensor name: bytes} for the
    weight and its new scales (plan_merge checked both are in this shard)."""
    name = out.quantized
    weight = plan.base.quantized[name]
    merged = _ArrayWriter(weight.shape)
    values, held = _dequantize(plan, name, source)
    as_float32 = OutputTensor(name, "F32", tuple(weight.shape), name, "merge", out.kernel, held, name)
    _merge_tensor(plan, as_float32, values.reshape(-1).view(np.uint8), merged, work, torch_state)
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


def _merge_tensor(plan: MergePlan, out: OutputTensor, raw: memoryview, writer, work, torch_state) -> None:
    """Compute `out` from `raw` (its values, held as out.held) with the kernel the plan chose."""
    ops = plan.ops.get(out.name)
    if out.kernel == "numpy":
        stored = np.dtype(kernel_numpy.DTYPES[out.held])
        flat = np.frombuffer(raw, dtype=np.uint8)
        if flat.ctypes.data % stored.itemsize:  # other writers need not align tensors: copy this one
            flat = flat.copy()
        base = kernel_numpy.StoredRows(flat.view(stored).reshape(out.shape), out.held)
        kernel_numpy.merge_tensor(plan, ops, base, out.dtype, writer, out.name, work)
    else:
        torch_state.merge(plan, ops, np.frombuffer(raw, dtype=np.uint8), out.held, out.dtype, out.shape, writer, out.name)


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
