"""Every merge with torch: one base tensor after the plan's ops, as PEFT's merge_and_unload
computes it (W + s·B@A in float32 — float64 for a float64 base, as PEFT computes there —, DoRA's
renormalisation, KaSA's truncation, replaced rows, lora_bias), on CPU or a GPU. (Plain LoRA of a
2-D weight on CPU takes the torch-free kernel_numpy.py.) A convolution's weight (out, in, *kernel)
is merged as its (out, in·Πkernel) matrix: PEFT's ΔW = s·B⊛A (conv of A's kernels with B's 1x1
one, or B@A for 1x1 kernels) is s·B@A of the factors' matrix views, entry for entry.

The base tensor may be a view of a read-only memory map: nothing here writes into it; every
in-place step works on a copy. Results go to a `TensorOutput`, whose `store(value)` takes the
tensor's rows in order (whole, or block after block), rounds them into the output dtype inside
a writer buffer, checks them for NaN/Inf and queues them.

On a CUDA device, each tensor is staged through pinned host memory and copied asynchronously,
rounded on the device, and copied back into a pinned buffer the writer thread waits for: the
device computes one tensor while the host stages the next and the writer stores the last.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ...arch import Layout
from ...errors import LoraToolsError
from ...formats.torch_dtypes import TORCH_DTYPES
from .kernel_numpy import ROW_BLOCK_BYTES
from .plan import MergePlan, TensorOps

CHUNK_BYTES = 1 << 20  # output rows rounded, checked and queued per step: stays in cache


def merge_tensor(plan: MergePlan, ops: TensorOps | None, raw: np.ndarray, in_dtype: str, out_dtype: str,
                 shape: tuple[int, ...], writer, name: str, dev: torch.device, state: "DeviceState") -> None:
    """Queue on `writer` the tensor stored as `raw` (its bytes, read-only) after `ops` (None:
    only a dtype change)."""
    base = tensor_from_bytes(raw, TORCH_DTYPES[in_dtype], _stored_shape(ops, raw, TORCH_DTYPES[in_dtype], shape))
    if state.stager is not None:
        base = state.stager.to_device(base)
    out = TensorOutput(writer, name, TORCH_DTYPES[out_dtype], shape, state.checks)
    if ops is None:
        out.store(base)
    else:
        apply_ops(plan, ops, base, out, dev)
    out.finish()


def _stored_shape(ops: TensorOps | None, raw: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The base tensor's own shape. A replaced tensor is written in the adapter's shape, which
    for a resized vocabulary has other rows than the base's (vocab.py)."""
    if ops is None or ops.replace_key is None or len(shape) != 2:
        return shape
    return (raw.size // (dtype.itemsize * max(1, shape[1])), shape[1])


def tensor_from_bytes(raw: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor viewing the bytes (no copy unless they are not aligned for the dtype)."""
    if raw.ctypes.data % dtype.itemsize:  # torch views need aligned data; other writers may not align
        raw = raw.copy()
    with warnings.catch_warnings():  # a read-only map: nothing writes through this view (see apply_ops)
        warnings.simplefilter("ignore")
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw.size else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).view(shape)


def apply_ops(plan: MergePlan, ops: TensorOps, base: torch.Tensor, out: "TensorOutput", dev: torch.device) -> None:
    """Store into `out` the base tensor after the plan's ops."""
    adapter = plan.adapter
    work = compute_dtype(base.dtype)
    if ops.replace_key is not None:
        # PEFT loads a saved tensor into the existing parameter, i.e. in the base's dtype.
        base = adapter.tensor(ops.replace_key).to(base.dtype)
    if ops.rows:
        base = base.clone()
        for tokens in ops.rows:  # PEFT: index_copy of the trained rows, cast to the base dtype
            base[list(tokens.indices)] = adapter.tensor(tokens.key).to(device=base.device, dtype=base.dtype)
    if not (ops.modules or ops.lora_biases):
        out.store(base)
        return
    if base.dim() > 2 and not any(m.expert for m in ops.modules):  # an nn.ConvNd weight (out, in, *kernel):
        base = base.reshape(base.shape[0], -1)  # merged as its (out, in·Πkernel) matrix (adapter.factors gives A, B as matrices)
    low_rank = []  # (L, R, s, first row): ΔW = s·L@R in the base tensor's own orientation, from that row
    for module in ops.modules:
        a, b = (t.to(device=dev, dtype=work) for t in adapter.factors(module.path))
        s = module.scaling * plan.scale
        if module.diag_key is not None:
            diag = adapter.tensor(module.diag_key).to(device=dev, dtype=work)
            out.store(_kasa(_working_copy(base, dev), a, b * diag, s))
            return
        if module.magnitude_key is not None:
            magnitude = adapter.tensor(module.magnitude_key).to(device=dev, dtype=work).reshape(-1)  # ConvNd: (1, out, 1, …)
            out.store(dora_weight(_working_copy(base, dev), a, b, s, magnitude, module.layout))
            return
        # a transposed layout holds ΔW as (B@A).T = A.T @ B.T
        low_rank.append((a.T.contiguous(), b.T.contiguous(), s, module.first_row) if module.layout.transposed
                        else (b, a, s, module.first_row))
    if base.dim() == 1:  # a bias: lora_bias adds s·lora_B.bias
        w = _working_copy(base, dev)
        for module in ops.lora_biases:
            w.add_(adapter.tensor(module.lora_bias_key).to(device=dev, dtype=work), alpha=module.scaling * plan.scale)
        out.store(w)
        return
    if dev.type != "cpu" or base.dim() > 2:  # (a tensor of all experts, (E, d1, d2): its rows are (E·d1, d2))
        w = _working_copy(base, dev)
        rows = w.view(-1, w.shape[-1])
        for left, right, s, first in low_rank:
            rows[first: first + left.shape[0]].addmm_(left, right, alpha=s)
        out.store(w)
        return
    # CPU: row blocks, so the working copy stays in cache and each byte of the base is read and
    # written once. Same arithmetic: W + s·L@R in float32 (float64), rounded once into `out`.
    # The block is one reused buffer: a fresh allocation per block would be returned to the OS and
    # page-faulted in again every time, which costs more than the arithmetic.
    rows_per_block = max(1, ROW_BLOCK_BYTES // (work.itemsize * max(1, base.shape[1])))
    workspace = torch.empty((rows_per_block, base.shape[1]), dtype=work)
    for start in range(0, base.shape[0], rows_per_block):
        stop = min(start + rows_per_block, base.shape[0])
        block = workspace[: stop - start]
        block.copy_(base[start:stop])
        for left, right, s, first in low_rank:  # rows lo:hi of this block are rows of ΔW
            lo, hi = max(start, first), min(stop, first + left.shape[0])
            if lo < hi:
                block[lo - start: hi - start].addmm_(left[lo - first: hi - first], right, alpha=s)
        out.store(block)


def compute_dtype(base: torch.dtype) -> torch.dtype:
    """What a base tensor is merged in: float32, or float64 for a float64 base (float32 would
    lose its precision: PEFT's merge of a float64 model is float64 throughout)."""
    return torch.float64 if base == torch.float64 else torch.float32


def _working_copy(base: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A copy in the compute dtype on the device that may be changed in place (the base may be a
    read-only map)."""
    return base.to(device=dev, dtype=compute_dtype(base.dtype), copy=True)


def _kasa(w: torch.Tensor, a: torch.Tensor, b_diag: torch.Tensor, s: float) -> torch.Tensor:
    """PEFT's KaSA: the base loses its r smallest singular components (an SVD in float32 whatever
    the base, as PEFT's at load), then ΔW = s·(B·diag(d))·A."""
    u, sv, vh = torch.linalg.svd(w.float(), full_matrices=False)
    keep = min(w.shape) - a.shape[0]
    truncated = ((u[:, :keep] * sv[:keep]) @ vh[:keep]).to(w.dtype)
    return truncated.addmm_(b_diag, a, alpha=s)


def dora_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, magnitude: torch.Tensor, layout: Layout) -> torch.Tensor:
    """W' = m / ‖W + ΔW‖_row · (W + ΔW), the norm taken per output row of the (out, in) view."""
    view = layout.lora_view(w).addmm(b, a, alpha=s)
    view.mul_((magnitude / torch.linalg.norm(view, dim=1)).unsqueeze(1))
    return layout.lora_view(view)


class DeviceState:
    """What a shard's torch merges share: the NaN/Inf checks and, on a GPU, the pinned stager."""

    def __init__(self, dev: torch.device):
        self.checks = FiniteChecks()
        self.stager = DeviceStager(dev) if dev.type != "cpu" else None

    @staticmethod
    def allocator(dev: torch.device):
        """Writer buffers in pinned memory for a GPU (device→host copies can then be async)."""
        if dev.type != "cuda":
            return None
        return lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True).numpy()

    def verify(self) -> None:
        self.checks.verify()


class FiniteChecks:
    """NaN/Inf checks of the rounded output. On CPU each chunk is checked at once, while it is in
    cache; on a device the (min, max) pairs are kept there and read back once per shard, so the
    host never waits for the device in between."""

    def __init__(self):
        self.pending: list[tuple[str, torch.Tensor]] = []

    def check(self, name: str, values: torch.Tensor) -> None:
        if not values.is_floating_point() or values.numel() == 0:
            return
        # min and max propagate NaN and show ±Inf: one fast reduction (isfinite is ~15x slower)
        # (in float64 when the values are: a float64 value beyond float32's range is finite)
        low_high = torch.stack(torch.aminmax(values))
        low_high = low_high if low_high.dtype == torch.float64 else low_high.float()
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


class TensorOutput:
    """One output tensor, streamed: `store(value)` takes its rows in order (the whole tensor or
    successive row blocks), rounds them into the output dtype inside a writer buffer, checks
    them, and queues them for writing."""

    def __init__(self, writer, name: str, dtype: torch.dtype, shape, checks: FiniteChecks):
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
            slot = self.writer.buffer(chunk.shape[0] * row_bytes)
            target = torch.from_numpy(slot).view(self.dtype).view(chunk.shape)
            target.copy_(chunk)
            self.checks.check(self.name, target)
            self.writer.write(slot, slot=True)
        self.rows_done += rows.shape[0]

    def _store_from_device(self, rows: torch.Tensor) -> None:
        rounded = rows.to(self.dtype)  # rounded on the device: a quarter of the bytes to move back
        self.checks.check(self.name, rounded)
        nbytes = rounded.numel() * self.dtype.itemsize
        slot = self.writer.buffer(nbytes)  # pinned (see DeviceState)
        torch.from_numpy(slot).view(self.dtype).view(rounded.shape).copy_(rounded, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.writer.write(slot, slot=True, ready=done)
        self.rows_done += rows.shape[0]

    def finish(self) -> None:
        expected = self.shape[0] if len(self.shape) >= 2 else max(1, math.prod(self.shape))
        if self.rows_done != expected and math.prod(self.shape):
            raise LoraToolsError(f"internal: {self.name} got {self.rows_done} of {expected} rows")


class DeviceStager:
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
