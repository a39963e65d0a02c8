"""The common merge without torch: W + Σ s·L@R for a bf16, float16 or float32 weight on CPU.

Importing torch costs ~1.5 s, as long as merging a 1B model takes; plain LoRA on Linear,
Conv1D and Embedding weights (nearly every adapter) needs only a matrix product, which numpy
does with the same float32 arithmetic. Everything else (DoRA, KaSA, replaced rows, lora_bias,
other dtypes, a GPU) goes through kernel_torch.py with torch.

Row blocks of ~1 MB: widen into a float32 block, add the products, round once
into a writer buffer (bfloat16: round to nearest even on the bits, as torch does), check, queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...errors import LoraToolsError
from ...formats.dtypes import HELD
from ..rounding import round_to_bf16

if TYPE_CHECKING:
    from .plan import MergePlan, TensorOps

ROW_BLOCK_BYTES = 1 << 20  # float32 rows processed per step: small enough to stay in cache

DTYPES = {code: np.dtype(held).type for code, held in HELD.items()}  # as stored (bf16 as its bits)
# Magnitude bits (sign cleared) of a float32 at or above which bfloat16 rounding gives Inf or NaN.
BF16_OVERFLOW = 0x7F7F8000


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


def merge_tensor(plan: MergePlan, ops: TensorOps, base: np.ndarray, in_dtype: str, out_dtype: str,
                 writer, name: str, work: Workspace) -> None:
    """Queue the merged tensor on `writer` (its `begin` already called). base: the stored
    values (bf16 as uint16 bits), shape (rows, cols) — or (E, d1, d2), all experts, seen as
    (E·d1, d2) — read-only."""
    base = base.reshape(-1, base.shape[-1])
    products = []  # (s·L, R, first row): ΔW = s·L@R in the base tensor's own orientation, from that row
    for module in ops.modules:
        a, b = (x.astype(np.float32, copy=False) for x in plan.adapter.factor_arrays(module.path))
        s = np.float32(module.scaling * plan.scale)
        # a transposed layout holds ΔW as (B@A).T = A.T @ B.T
        left, right = (a.T, b.T) if module.layout.transposed else (b, a)
        products.append((np.ascontiguousarray(left * s), np.ascontiguousarray(right), module.first_row))
    with np.errstate(all="ignore"):  # overflow is found and refused explicitly (_round_into), not warned about
        _merge_blocks(products, base, in_dtype, out_dtype, writer, name, work)


def store(values: np.ndarray, in_dtype: str, out_dtype: str, writer, name: str, work: Workspace) -> None:
    """Queue values held as `in_dtype` rounded into the output dtype (a dequantized weight no ΔW touches)."""
    with np.errstate(all="ignore"):
        _merge_blocks([], values.reshape(values.shape[0], -1), in_dtype, out_dtype, writer, name, work)


def _merge_blocks(products, base: np.ndarray, in_dtype: str, out_dtype: str, writer, name: str, work: Workspace) -> None:
    rows, cols = base.shape
    step = max(1, ROW_BLOCK_BYTES // (4 * max(1, cols)))
    out_type = DTYPES[out_dtype]
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        shape = (stop - start, cols)
        block = work.get("block", np.float32, shape)
        if in_dtype == "BF16":  # the top half of a float32: widen exactly by a shift
            np.left_shift(base[start:stop], 16, out=block.view(np.uint32), dtype=np.uint32)
        else:
            np.copyto(block, base[start:stop])
        product = work.get("product", np.float32, shape)
        for left, right, first in products:  # rows lo:hi of this block are rows of ΔW
            lo, hi = max(start, first), min(stop, first + left.shape[0])
            if lo < hi:
                np.matmul(left[lo - first: hi - first], right, out=product[lo - start: hi - start])
                block[lo - start: hi - start] += product[lo - start: hi - start]
        target = writer.buffer(shape[0] * cols * np.dtype(out_type).itemsize).view(out_type).reshape(shape)
        _round_into(block, target, out_dtype, work.get("bits", np.uint32, shape), name)
        writer.write(target, slot=True)


def _round_into(block: np.ndarray, target: np.ndarray, out_dtype: str, scratch: np.ndarray, name: str) -> None:
    """Round the float32 block once into the output dtype, refusing NaN/Inf (including values
    that overflow the output type)."""
    bits = block.view(np.uint32)
    np.bitwise_and(bits, 0x7FFFFFFF, out=scratch)  # magnitudes: the max shows NaN, Inf and overflow
    largest = int(scratch.max()) if scratch.size else 0
    if out_dtype == "BF16":
        if largest >= BF16_OVERFLOW:
            _not_finite(name, "bfloat16")
        round_to_bf16(bits, target, scratch)
    elif out_dtype == "F16":
        if largest >= 0x7F800000:
            _not_finite(name, "float32")
        np.copyto(target, block, casting="same_kind")
        if target.size and int((target.view(np.uint16) & 0x7C00).max()) == 0x7C00:
            _not_finite(name, "float16")
    else:
        if largest >= 0x7F800000:
            _not_finite(name, "float32")
        np.copyto(target, block)


def _not_finite(name: str, dtype: str) -> None:
    raise LoraToolsError(f"merged {name} is not finite (overflows {dtype}?); nothing was written", code="non-finite")
