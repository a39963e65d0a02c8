"""Rounding float32 to bfloat16, the one implementation (merge kernels and the dequantizer).

Round to nearest, ties to even, on the bits, as torch's float32 -> bfloat16 cast does: add 0x7FFF
plus the lowest bit that is kept, then keep the top half. NaN/Inf are checked by the callers.
"""

from __future__ import annotations

import numpy as np


def round_to_bf16(bits: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """`bits` (uint32 view of float32 values) rounded into `out` (uint16 bfloat16 bits);
    `scratch`: a uint32 array of the same size."""
    np.right_shift(bits, 16, out=scratch)
    np.bitwise_and(scratch, 1, out=scratch)
    np.add(scratch, 0x7FFF, out=scratch)
    np.add(scratch, bits, out=scratch)
    np.right_shift(scratch, 16, out=out, casting="unsafe")
