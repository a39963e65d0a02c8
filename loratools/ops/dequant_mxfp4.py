"""MXFP4 experts (gpt-oss checkpoints) to bfloat16, with numpy, exactly as transformers'
reference dequantization (integrations/mxfp4.py, convert_moe_packed_tensors) computes them.

Stored: `X_blocks` U8 (E, rows, G, 16) and `X_scales` U8 (E, rows, G). Each row holds G blocks of
32 e2m1 values, two per byte, the low nibble first; block g of row r is scaled by
2^(scales[e, r, g] - 127). transformers (torch.ldexp) gives the exact product code · 2^(s-127),
which bf16 holds exactly (at least 2^-128 in magnitude, two significant bits) unless it is
beyond float32's range (scales 254 and 255): then ±inf. It then transposes (E, rows, G·32) into
the (E, in, out) parameter x @ W computes with: rows are W's outputs. Checked bit for bit against
transformers' function for every code under every scale, in bf16 and float32.

Every value is one of 16 codes times one of 256 scales, so a byte (two codes) under a scale has
one of 256·256 results: a table of both bf16 values as one uint32 (the low nibble's in its low
half, which is the first element in memory) turns each byte into its two values with one gather.
"""

from __future__ import annotations

import numpy as np

from ..formats.checkpoint import Checkpoint
from ..formats.quantized import QuantizedWeight
from . import fused
from .rounding import round_to_bf16, widen_bf16

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
E2M1_MAX = 6.0
BIAS = 127


def _pair_table() -> np.ndarray:
    """(256 scales · 256 bytes,) uint32: the bf16 bits of a byte's two values under a scale."""
    with np.errstate(over="ignore"):  # beyond float32's range: inf, as transformers gives
        products = np.ldexp(E2M1.astype(np.float64)[None, :], np.arange(256)[:, None] - BIAS).astype(np.float32)
    bits = np.empty(products.shape, dtype=np.uint16)
    round_to_bf16(products.view(np.uint32), bits, np.empty(products.shape, dtype=np.uint32))
    byte = np.arange(256)
    low, high = bits[:, byte & 15].astype(np.uint32), bits[:, byte >> 4].astype(np.uint32)
    return (low | (high << 16)).reshape(-1)


PAIRS = _pair_table()


TILE = 256  # the transposition is copied in square tiles that stay in cache


def dequantize(blocks: np.ndarray, scales: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """bf16 bits (uint16) of shape `shape` = (E, G·32, rows) from the stored blocks (bytes,
    (E, rows, G, 16) in memory order) and scales (uint8, (E, rows, G)): one expert at a time."""
    experts, cols, rows = shape
    blocks = blocks.reshape(experts, rows, cols // 32, 16)
    scales = scales.reshape(experts, rows, cols // 32)
    out = np.empty(shape, dtype=np.uint16)
    index = np.empty(blocks.shape[1:], dtype=np.intp)  # numpy's own index type: take converts no other
    pairs = np.empty(blocks.shape[1:], dtype=np.uint32)
    values = pairs.view(np.uint16).reshape(rows, cols)
    for e in range(experts):
        np.multiply(scales[e, :, :, None], 256, out=index, dtype=np.intp)
        np.add(index, blocks[e], out=index)
        np.take(PAIRS, index, out=pairs, mode="clip")  # every index is < 256·256: clip only skips the check
        for r in range(0, rows, TILE):
            for c in range(0, cols, TILE):
                out[e, c: c + TILE, r: r + TILE] = values[r: r + TILE, c: c + TILE].T
    return out


class Mxfp4Rows:
    """An MXFP4 weight (E, cols, rows) as a row source for the merge kernel: rows of its
    (E·cols, rows) view, decoded one expert at a time (the expert being merged is held, 2·cols·rows
    bytes: 33 MB for gpt-oss-20b against 1.1 GB for the whole weight)."""

    def __init__(self, blocks: np.ndarray, scales: np.ndarray, shape: tuple[int, ...]):
        self.experts, self.cols, self.out_rows = shape
        self.blocks = blocks.reshape(self.experts, -1)
        self.scales = scales.reshape(self.experts, -1)
        self.shape = (self.experts * self.cols, self.out_rows)
        self.dtype = "BF16"
        self.one_pass = fused.native is not None
        self._held: tuple[int, np.ndarray] | None = None

    def _expert(self, e: int) -> np.ndarray:
        if self._held is None or self._held[0] != e:
            self._held = e, dequantize(self.blocks[e], self.scales[e], (1, self.cols, self.out_rows))[0]
        return self._held[1]

    def _runs(self, start: int, stop: int):
        """(expert's values, its first row, its last row, offset in the block) for rows [start, stop)."""
        while start < stop:
            e, lo = divmod(start, self.cols)
            hi = min(self.cols, lo + stop - start)
            yield self._expert(e), lo, hi, start
            start += hi - lo

    def fill(self, start: int, stop: int, block: np.ndarray, scratch: np.ndarray) -> None:
        for values, lo, hi, at in self._runs(start, stop):
            widen_bf16(values[lo:hi], block[at - start: at - start + hi - lo])

    def add_rounded(self, start: int, stop: int, delta: np.ndarray | None, out: np.ndarray, limit: float) -> bool:
        """As kernel_numpy.StoredRows.add_rounded (one pass of the C kernel per expert run)."""
        finite = True
        for values, lo, hi, at in self._runs(start, stop):
            part = slice(at - start, at - start + hi - lo)
            finite &= fused.native.add_bf16(values[lo:hi], None if delta is None else delta[part], out[part], limit)
        return finite


def largest(scales: np.ndarray) -> float:
    """max|W| of a weight with these scales (exact: bf16 holds every value, or it is inf)."""
    return E2M1_MAX * 2.0 ** (int(scales.max(initial=0)) - BIAS)


def read_scales(checkpoint: Checkpoint, weight: QuantizedWeight) -> np.ndarray:
    name = weight.parts["scales"]
    return checkpoint.store(name).array(name)


def read(checkpoint: Checkpoint, weight: QuantizedWeight) -> np.ndarray:
    """A whole MXFP4 weight as bf16 bits."""
    blocks = checkpoint.store(weight.stored).raw(weight.stored)
    return dequantize(blocks, read_scales(checkpoint, weight), weight.shape)
