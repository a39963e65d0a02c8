"""float32 <-> bfloat16, the one implementation (merge kernels and the dequantizer).

Rounding is to nearest, ties to even, as torch's float32 -> bfloat16 cast does. Two ways give
the same bits (tests/test_rounding.py checks both against the definition on edge values):

- torch's cast, one pass (~4x faster), used when torch is already imported and the values are
  known finite: importing torch only for this would cost more (1.5-2 s) than it saves below
  about 4B merged parameters;
- otherwise numpy on the bits: add 0x7FFF plus the lowest bit that is kept, keep the top half
  (five passes; no numpy-only single pass exists, and ml_dtypes' bfloat16 cast was measured no
  faster per element, with 0.5 s of import).

Widening bfloat16 -> float32 is exact: the bits become the top half of a float32.

Finite results are the callers' business (`finite_below` is the check, on the float32 input:
the bit path turns some NaN payloads into zeros, so the output cannot be checked instead).
"""

from __future__ import annotations

import sys

import numpy as np

# The smallest float32 magnitude that bfloat16 rounding takes to Inf (bits 0x7F7F8000: a tie
# between the largest finite bfloat16 and Inf, and the largest finite one is odd).
BF16_OVERFLOW = float(np.array(0x7F7F8000, dtype=np.uint32).view(np.float32))


def round_to_bf16(values: np.ndarray, out: np.ndarray, scratch: np.ndarray, *, finite: bool = False) -> None:
    """float32 `values` rounded into `out` (uint16 bfloat16 bits, same size); `scratch`: a uint32
    array of the same size (used by the numpy path only). finite: the caller has checked that
    every value rounds to a finite bfloat16 (`finite_below`); only then may torch's cast be
    used, which quiets a NaN where the bit path (the definition kept for NaN) can carry it into
    Inf or zero."""
    torch = sys.modules.get("torch")
    if finite and torch is not None and values.size and values.flags.writeable:  # a read-only array would warn
        torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).copy_(torch.from_numpy(values.view(np.float32)))
        return
    _rounded_bits(values.view(np.uint32), scratch)
    np.right_shift(scratch, 16, out=out, casting="unsafe")


def round_to_bf16_in_float32(values: np.ndarray, scratch: np.ndarray) -> None:
    """float32 `values` rounded to bfloat16 precision in place (the bit path: exactly what
    rounding into bfloat16 and widening back gives, NaNs included), in one pass fewer."""
    bits = values.view(np.uint32)
    _rounded_bits(bits, scratch)
    np.bitwise_and(scratch, 0xFFFF0000, out=bits)


def _rounded_bits(bits: np.ndarray, scratch: np.ndarray) -> None:
    """scratch = bits + 0x7FFF + the lowest kept bit (uint32, wrapping): its top half is the result."""
    np.right_shift(bits, 16, out=scratch)
    np.bitwise_and(scratch, 1, out=scratch)
    np.add(scratch, 0x7FFF, out=scratch)
    np.add(scratch, bits, out=scratch)


def widen_bf16(bits: np.ndarray, out: np.ndarray) -> None:
    """bfloat16 `bits` (uint16) into float32 `out` (same shape), exactly: the top half of a float32."""
    wide = out.view(np.uint32)
    np.copyto(wide, bits)  # two plain passes beat one left_shift with a cast (measured 45 vs 57 µs/MiB)
    np.left_shift(wide, 16, out=wide)


def finite_below(values: np.ndarray, limit: float) -> bool:
    """Whether every float32 value is below `limit` in magnitude (BF16_OVERFLOW: rounds to a finite
    bfloat16), NaN excluded: two read-only reductions (NaN propagates through max and min)."""
    if not values.size:
        return True
    return bool(-limit < values.min()) and bool(values.max() < limit)
