"""The common merge without torch: W + Σ s·L@R for a bf16, float16 or float32 weight on CPU.

Importing torch costs ~1.5 s, as long as merging a 1B model takes; plain LoRA on Linear,
Conv1D and Embedding weights (nearly every adapter) needs only a matrix product, which numpy
does with the same float32 arithmetic. Everything else (DoRA, KaSA, replaced rows, lora_bias,
other dtypes, a GPU) goes through kernel_torch.py with torch.

Row blocks of ~1 MB: widen into a float32 block, add the products, check that it rounds to finite
values (two read-only reductions), round once into a writer buffer (rounding.py), queue. Into
bfloat16 (nearly every merge) the products go into a float32 block and one pass of the C
extension (ops/fused.py) does the rest; the numpy path is the same arithmetic, kept for every
other case and where the extension was not built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...errors import LoraToolsError
from ...formats.dtypes import HELD
from .. import fused
from ..rounding import BF16_OVERFLOW, finite_below, round_to_bf16, widen_bf16

if TYPE_CHECKING:
    from .plan import MergePlan, TensorOps

ROW_BLOCK_BYTES = 1 << 20  # float32 rows processed per step: small enough to stay in cache

DTYPES = {code: np.dtype(held).type for code, held in HELD.items()}  # as stored (bf16 as its bits)
# Per output dtype: the float32 magnitude from which rounding into it gives Inf (float16: halfway
# between its largest finite value 65504 and 65536, a tie that goes to the even Inf), and its name.
FINITE_BELOW = {"BF16": (BF16_OVERFLOW, "bfloat16"), "F16": (65520.0, "float16"), "F32": (float("inf"), "float32")}


class Workspace:
    """Float32 and uint32 blocks reused for every tensor of a shard (fresh ones would be
    page-faulted in again for every block)."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, slot: str, dtype, shape: tuple[int, int]) -> np.ndarray:
        n = shape[0] * shape[1] * np.dtype(dtype).itemsize
        buf = self.arrays.get(slot)
        if buf is None or buf.size < n:
            buf = self.arrays[slot] = np.empty(n, dtype=np.uint8)
        return buf[:n].view(dtype).reshape(shape)


class StoredRows:
    """Rows of a stored tensor's 2-D view (bf16 as its bits, float16, float32), widened into
    float32 blocks (fill), or with ΔW added and rounded into bf16 in one pass where `one_pass`
    (add_rounded). The other row sources: dequant.BnbRows (a bnb 4-bit weight) and
    dequant_mxfp4.Mxfp4Rows. A tensor of all experts (E, d1, d2) is seen as (E·d1, d2): expert
    e's ΔW starts at row e·d1."""

    def __init__(self, values: np.ndarray, dtype: str):
        self.values, self.dtype = values.reshape(-1, values.shape[-1] if values.ndim > 1 else 1), dtype
        self.shape = self.values.shape
        self.one_pass = fused.native is not None and dtype in ("BF16", "F32")

    def add_rounded(self, start: int, stop: int, delta: np.ndarray | None, out: np.ndarray, limit: float) -> bool:
        """Rows [start, stop) plus ΔW rows `delta` (None: none) rounded into bfloat16 bits `out`
        in one pass (fused.py); whether every sum is below `limit` in magnitude."""
        if self.dtype == "BF16":
            return fused.native.add_bf16(self.values[start:stop], delta, out, limit)
        return fused.native.add_f32(self.values[start:stop], delta, out, limit, False)

    def fill(self, start: int, stop: int, block: np.ndarray, scratch: np.ndarray) -> None:
        if self.dtype == "BF16":  # the top half of a float32: widened exactly
            widen_bf16(self.values[start:stop], block)
        else:
            np.copyto(block, self.values[start:stop])


def merge_tensor(plan: MergePlan, ops: TensorOps, base, out_dtype: str, writer, name: str, work: Workspace) -> None:
    """Queue the merged tensor on `writer` (its `begin` already called). base: a row source
    (StoredRows, dequant.BnbRows, dequant_mxfp4.Mxfp4Rows) of shape (rows, cols)."""
    products = []  # (s·L, R, first row): ΔW = s·L@R in the base tensor's own orientation, from that row
    for module in ops.modules:
        a, b = (x.astype(np.float32, copy=False) for x in plan.adapter.factor_arrays(module.path))
        s = np.float32(module.scaling * plan.scale)
        # a transposed layout holds ΔW as (B@A).T = A.T @ B.T
        left, right = (a.T, b.T) if module.layout.transposed else (b, a)
        products.append((np.ascontiguousarray(left * s), np.ascontiguousarray(right), module.first_row))
    with np.errstate(all="ignore"):  # overflow is found and refused explicitly (finite_below), not warned about
        _merge_blocks(products, base, out_dtype, writer, name, work)


def store(values, out_dtype: str, writer, name: str, work: Workspace, *, check: bool = True) -> None:
    """Queue a row source's values rounded into the output dtype (a dequantized weight no ΔW
    touches). check=False: written as they are, NaN and Inf included (values already held in
    `out_dtype`'s precision, so the rounding is exact)."""
    with np.errstate(all="ignore"):
        _merge_blocks([], values, out_dtype, writer, name, work, check=check)


def _merge_blocks(products, base, out_dtype: str, writer, name: str, work: Workspace, *, check: bool = True) -> None:
    if check and out_dtype == "BF16" and base.one_pass and _disjoint(products):
        _merge_blocks_one_pass(products, base, writer, name, work)
        return
    rows, cols = base.shape
    step = _rows_per_block(cols)
    out_type = DTYPES[out_dtype]
    limit, out_name = FINITE_BELOW[out_dtype]
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        shape = (stop - start, cols)
        block, bits = work.get("block", np.float32, shape), work.get("bits", np.uint32, shape)
        base.fill(start, stop, block, bits)
        product = work.get("product", np.float32, shape)
        for left, right, first in products:  # rows lo:hi of this block are rows of ΔW
            lo, hi = max(start, first), min(stop, first + left.shape[0])
            if lo < hi:
                np.matmul(left[lo - first: hi - first], right, out=product[lo - start: hi - start])
                block[lo - start: hi - start] += product[lo - start: hi - start]
        if check and not finite_below(block, limit):
            _not_finite(name, out_name)
        target = writer.buffer(shape[0] * cols * np.dtype(out_type).itemsize).view(out_type).reshape(shape)
        if out_dtype == "BF16":
            round_to_bf16(block, target, bits, finite=check)
        else:
            np.copyto(target, block, casting="same_kind")
        writer.write(target, slot=True)


def _rows_per_block(cols: int) -> int:
    """Rows of a ROW_BLOCK_BYTES float32 block (at least one)."""
    return max(1, ROW_BLOCK_BYTES // (4 * max(1, cols)))


def _not_finite(name: str, dtype: str) -> None:
    raise LoraToolsError(f"merged {name} is not finite (overflows {dtype}?); nothing was written", code="non-finite")


def _disjoint(products) -> bool:
    """Whether no row gets two products (then each row's sum is base + one product, the order
    the numpy path adds in; two would be added one after the other)."""
    spans = sorted((first, first + left.shape[0]) for left, _, first in products)
    return all(stop <= start for (_, stop), (start, _) in zip(spans, spans[1:]))


def _merge_blocks_one_pass(products, base, writer, name: str, work: Workspace) -> None:
    """_merge_blocks into bfloat16: each product into a float32 block, then one pass of the C
    extension per run of rows (widen or decode, add, check, round). The same bits."""
    rows, cols = base.shape
    step = _rows_per_block(cols)
    products = sorted(products, key=lambda p: p[2])
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        target = writer.buffer((stop - start) * cols * 2).view(np.uint16).reshape(stop - start, cols)
        product = work.get("product", np.float32, (stop - start, cols))
        finite, done = True, start  # rows before `done` are in target
        for left, right, first in products:
            lo, hi = max(start, first), min(stop, first + left.shape[0])
            if lo >= hi:
                continue
            if done < lo:  # rows no product touches: the base alone, checked and rounded
                finite &= base.add_rounded(done, lo, None, target[done - start: lo - start], BF16_OVERFLOW)
            delta = product[lo - start: hi - start]
            np.matmul(left[lo - first: hi - first], right, out=delta)
            finite &= base.add_rounded(lo, hi, delta, target[lo - start: hi - start], BF16_OVERFLOW)
            done = hi
        if done < stop:
            finite &= base.add_rounded(done, stop, None, target[done - start:], BF16_OVERFLOW)
        if not finite:
            _not_finite(name, "bfloat16")
        writer.write(target, slot=True)
