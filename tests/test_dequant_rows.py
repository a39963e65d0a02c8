"""bnb 4-bit weights decoded row block by row block (dequant.BnbRows, what the merge loop uses)
give exactly the whole-tensor dequantization, whatever the split: blocks cut mid-way, odd
element offsets (a code's high or low nibble first), chunks larger than the fast path's."""

from __future__ import annotations

import numpy as np
import pytest

from loratools.ops import dequant
from loratools.ops.rounding import widen_bf16


def definition(packed: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int, numel: int) -> np.ndarray:
    """Element i: code[its nibble, high first] × absmax[i // blocksize], one float32 product."""
    nibbles = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:numel]
    return code[nibbles] * absmax[np.arange(numel) // blocksize]


def _weight(shape, blocksize, seed):
    rng = np.random.default_rng(seed)
    numel = int(np.prod(shape))
    packed = rng.integers(0, 256, size=(numel + 1) // 2, dtype=np.uint8)
    absmax = rng.uniform(0.01, 3, size=-(-numel // blocksize)).astype(np.float32)
    code = np.sort(rng.uniform(-1, 1, size=16)).astype(np.float32)
    return packed, absmax, code


@pytest.mark.parametrize("shape, blocksize, dtype", [
    ((37, 129), 64, "BF16"),  # odd columns: row blocks start mid-block and on odd elements
    ((300, 1000), 128, "BF16"),  # several fast-path chunks per row block
    ((33, 65), 32, "F16"),
    ((17, 31), 4096, "F32"),  # one partial block for the whole weight
])
def test_rows_are_the_whole_dequantization(shape, blocksize, dtype):
    packed, absmax, code = _weight(shape, blocksize, seed=sum(shape))
    whole = dequant.dequantize_bnb(packed, absmax, code, blocksize, shape, dtype)
    products = definition(packed, absmax, code, blocksize, int(np.prod(shape))).reshape(shape)
    if dtype == "BF16":
        expected = np.empty(shape, dtype=np.float32)
        widen_bf16(whole, expected)
        assert np.array_equal(whole, (products.view(np.uint32) + 0x7FFF + ((products.view(np.uint32) >> 16) & 1)) >> 16)
    else:
        expected = whole.astype(np.float32)
        assert np.array_equal(whole, products.astype(whole.dtype))
    rows = dequant.BnbRows(packed, absmax, code, blocksize, shape, dtype)
    assert rows.shape == shape
    for step in (1, 3, 7, shape[0]):
        got = np.empty(shape, dtype=np.float32)
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            rows.fill(start, stop, got[start:stop], np.empty((stop - start, shape[1]), dtype=np.uint32))
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), step
