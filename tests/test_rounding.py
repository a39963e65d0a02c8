"""bfloat16 rounding and widening (ops/rounding.py) against their definition, bit for bit.

The definition is the bit arithmetic loratools always used (round to nearest, ties to even, as
torch's cast): the faster paths must give the same bits on every edge value, and the finite
check must refuse exactly what the old one refused.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from loratools.ops.rounding import BF16_OVERFLOW, finite_below, round_to_bf16, widen_bf16


def reference_round(bits: np.ndarray) -> np.ndarray:
    """The definition: add 0x7FFF plus the lowest kept bit, keep the top half (uint32 wraps)."""
    bits = bits.astype(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def reference_finite(bits: np.ndarray) -> bool:
    """The old check: no magnitude at or above the first float32 that rounds to Inf (NaN included)."""
    return bool(((bits.astype(np.uint32) & 0x7FFFFFFF) < 0x7F7F8000).all())


def edge_bits() -> np.ndarray:
    """Ties (odd and even kept halves), one below and above them, subnormals, the largest finite
    values, values rounding to Inf, ±0, ±Inf, NaNs with several payloads, both signs."""
    his = np.array([0x0000, 0x0001, 0x0002, 0x007F, 0x0080, 0x0081, 0x3F7F, 0x3F80, 0x3F81, 0x7F7E, 0x7F7F, 0x7F80, 0x7FC0, 0x7FFF],
                   dtype=np.uint32)
    los = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    positive = ((his[:, None] << 16) | los[None, :]).reshape(-1)
    return np.concatenate([positive, positive | 0x80000000])


def random_bits(n: int = 1 << 20) -> np.ndarray:
    rng = np.random.default_rng(24)
    bits = rng.integers(0, 1 << 32, size=n, dtype=np.uint32)
    bits[: n // 4] &= 0xFFFF0000  # a quarter exact bfloat16 values
    bits[: n // 4] |= 0x8000  # ... turned into ties
    return bits


def _round(bits: np.ndarray, *, finite: bool) -> np.ndarray:
    values = bits.view(np.float32).copy()
    out = np.empty(values.shape, dtype=np.uint16)
    round_to_bf16(values, out, np.empty(values.shape, dtype=np.uint32), finite=finite)
    return out


@pytest.mark.parametrize("torch_loaded", [True, False])
@pytest.mark.parametrize("bits", [edge_bits(), random_bits()], ids=["edges", "random"])
def test_rounding_is_the_definition(bits, torch_loaded, monkeypatch):
    if not torch_loaded:
        monkeypatch.delitem(sys.modules, "torch")
    expected = reference_round(bits)
    # Any value, unchecked: the bit path, NaNs included, exactly as before.
    assert np.array_equal(_round(bits, finite=False), expected)
    # Values the caller checked finite may take torch's single-pass cast: the same bits.
    ok = (bits & 0x7FFFFFFF) < 0x7F7F8000
    assert ok.sum() > len(bits) // 2
    assert np.array_equal(_round(bits[ok], finite=True), expected[ok])


def test_torch_cast_is_what_the_fast_path_uses():
    """The fast path is torch's cast itself: compare against .to(torch.bfloat16) directly."""
    bits = random_bits()
    bits = bits[(bits & 0x7FFFFFFF) < 0x7F7F8000]
    cast = torch.from_numpy(bits.view(np.float32).copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(_round(bits, finite=True), cast)


@pytest.mark.parametrize("bits", [edge_bits(), random_bits()], ids=["edges", "random"])
def test_finite_check_refuses_what_the_old_one_refused(bits):
    assert not reference_finite(bits)  # the inputs hold NaN, Inf and overflowing values
    assert finite_below(bits.view(np.float32), BF16_OVERFLOW) is False
    for value in bits[:4096]:  # one value at a time: each is accepted or refused as before
        one = np.array([value], dtype=np.uint32)
        assert finite_below(one.view(np.float32), BF16_OVERFLOW) == reference_finite(one), hex(int(value))
    finite = bits[(bits & 0x7FFFFFFF) < 0x7F7F8000]
    assert finite_below(finite.view(np.float32), BF16_OVERFLOW) is True
    assert finite_below(np.empty(0, dtype=np.float32), BF16_OVERFLOW) is True


def test_float16_limit_is_where_numpy_rounds_to_inf():
    """65520 (halfway to 65536, a tie that goes to the even Inf) is the first float32 that
    numpy's float16 cast takes to Inf: the merge's float16 check uses it."""
    below = np.nextafter(np.float32(65520), np.float32(0))
    with np.errstate(over="ignore"):
        assert np.isfinite(np.float16(below)) and np.isinf(np.float16(np.float32(65520)))


def test_widening_is_exact():
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(halves.shape, dtype=np.float32)
    widen_bf16(halves, out)
    assert np.array_equal(out.view(np.uint32), halves.astype(np.uint32) << 16)
