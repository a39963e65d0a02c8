"""Quantized weights to their values (bnb: in its quant state's dtype; FP8: float32) and back, with numpy.

bitsandbytes 4-bit: the value of element i is quant_map[code_i] * absmax[i // blocksize], codes
packed two per byte, high nibble first, over the flattened weight. With double quant, absmax is
itself nested_quant_map[absmax_i] * nested_absmax[i // nested_blocksize] + nested_offset. Each
product is a float32, which bitsandbytes then rounds to its quant state's dtype: that rounded
value is the weight the 4-bit model computes with, so it is what `dequantize_bnb` returns
(bf16 as its bits). Checked bit for bit in the tests against that definition, written out in
torch, and against bitsandbytes' generic PyTorch dequantization; not against its native CPU
kernel, which on AVX-512 CPUs takes the wrong block's absmax when a row is not a whole number
of blocks (a test records that).

FP8 e4m3 with block scales: value = e4m3(code) * scale_inv[row // block_rows, col // block_cols],
in float32 (as DeepSeek's and transformers' reference dequantization compute it).
"""

from __future__ import annotations

import functools

import numpy as np

from ..formats.checkpoint import Checkpoint
from ..formats.dtypes import HELD
from ..formats.quantized import QuantizedWeight
from . import fused
from .rounding import round_to_bf16, round_to_bf16_in_float32, widen_bf16

E4M3_MAX = 448.0


# The bitsandbytes 4-bit schemes: decoded row block by row block (BnbRows). FP8 is decoded whole;
# MXFP4 expert by expert (dequant_mxfp4.Mxfp4Rows).
BNB_SCHEMES = ("nf4", "fp4")


def read_parts(checkpoint: Checkpoint, weight: QuantizedWeight) -> dict[str, np.ndarray]:
    """The small tensors a quantized weight needs beside its codes (scales, code maps)."""
    return {role: checkpoint.store(name).array(name) for role, name in weight.parts.items() if role != "state"}


def read_float32(checkpoint: Checkpoint, name: str) -> np.ndarray:
    """Any weight of a checkpoint as float32, dequantized if it is quantized (read whole)."""
    store = checkpoint.store(name)
    weight = checkpoint.quantized.get(name)
    if weight is None:
        return store.array(name).astype(np.float32, copy=False)
    return dequantize_float32(weight, store.raw(name), read_parts(checkpoint, weight))


def dequantize(weight: QuantizedWeight, stored: np.ndarray, parts: dict[str, np.ndarray]) -> np.ndarray:
    """The weight's values, shape weight.shape, as `value_dtype(weight)` holds them (bf16 as
    its uint16 bits): bnb in its quant state's dtype, FP8 in float32. stored: the quantized
    tensor's bytes (uint8)."""
    if weight.scheme == "fp8":
        return dequantize_fp8(stored, parts["scale_inv"], weight.shape, weight.block)
    return dequantize_bnb(stored, bnb_absmax(weight, parts), _bnb_code(weight, parts), weight.block[0], weight.shape, weight.dtype)


def bnb_rows(weight: QuantizedWeight, stored: np.ndarray, parts: dict[str, np.ndarray]) -> "BnbRows":
    """A bnb weight as a row source for the merge kernel (BnbRows)."""
    return BnbRows(stored, bnb_absmax(weight, parts), _bnb_code(weight, parts), weight.block[0], weight.shape, weight.dtype)


def _bnb_code(weight: QuantizedWeight, parts: dict[str, np.ndarray]) -> np.ndarray:
    code = parts["quant_map"].reshape(-1).astype(np.float32)
    if weight.scheme == "fp4" and code[8] == 0:
        code[8] = -0.0  # fp4's code 8 is sign bit + zero: bitsandbytes' scalar CPU kernel gives -0.0 there
    return code


def value_dtype(weight: QuantizedWeight) -> str:
    """The dtype code of what `dequantize` returns."""
    return "F32" if weight.scheme == "fp8" else weight.dtype


def dequantize_float32(weight: QuantizedWeight, stored: np.ndarray, parts: dict[str, np.ndarray]) -> np.ndarray:
    return widen(dequantize(weight, stored, parts), value_dtype(weight))


def widen(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 of values held as `dtype` (bf16 bits, float16, float32): exact."""
    if dtype == "BF16":
        out = np.empty(values.shape, dtype=np.float32)
        widen_bf16(values, out)
        return out
    return values.astype(np.float32, copy=False)


def bnb_absmax(weight: QuantizedWeight, parts: dict[str, np.ndarray]) -> np.ndarray:
    """The float32 scale of every block (double quant undone)."""
    absmax = parts["absmax"].reshape(-1)
    if not weight.nested:
        return absmax.astype(np.float32, copy=False)
    code = parts["nested_quant_map"].reshape(-1).astype(np.float32, copy=False)
    nested = np.repeat(parts["nested_absmax"].reshape(-1).astype(np.float32), weight.nested_blocksize)[: absmax.size]
    out = code[absmax] * nested
    out += np.float32(weight.nested_offset)
    return out


CHUNK = 1 << 14  # elements decoded per step (stays in cache); a multiple of every blocksize


def dequantize_bnb(packed: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int,
                   shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The whole weight, rounded into `dtype` (bf16 as its bits), chunk by chunk."""
    rows = BnbRows(packed, absmax, code, blocksize, shape, dtype)
    out = np.empty(rows.numel, dtype=HELD[dtype])
    values = np.empty(min(CHUNK, rows.numel), dtype=np.float32)
    scratch = np.empty(values.size, dtype=np.uint32)
    for start in range(0, rows.numel, CHUNK):
        stop = min(start + CHUNK, rows.numel)
        rows.decode(start, stop, values[: stop - start])
        _round_into(values[: stop - start], out[start:stop], dtype, scratch[: stop - start])
    return out.reshape(shape)


class BnbRows:
    """A bnb 4-bit weight as rows (its 2-D view: shape[0] × the rest) decoded on demand, so a
    merge dequantizes each row block into its own float32 block: no whole-tensor array, and
    the values go through one rounding into the quant state's dtype (exactly what the 4-bit
    model computes with) and one into the output's."""

    def __init__(self, packed: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int,
                 shape: tuple[int, ...], dtype: str):
        self.numel = int(np.prod(shape, dtype=np.int64))
        self.shape = (shape[0], self.numel // max(1, shape[0])) if shape else (1, 1)
        self.dtype, self.blocksize = dtype, blocksize
        self.packed, self.absmax, self.code = packed.reshape(-1), absmax, code
        # two packed bytes (a little-endian uint16) index a table of their four code values, taken
        # as one 16-byte item: a numpy gather costs per index, and a 1-D one of whole items is the fast one
        self.pairs = self.packed[: self.numel // 4 * 2].view("<u2")
        self.four = _four_codes(code.tobytes()).view("V16").reshape(-1)
        # the one-pass kernel decodes from the codes as fill does (quant state bf16 or float32)
        self.one_pass = fused.native is not None and dtype in ("BF16", "F32") and code.size == 16

    def add_rounded(self, start: int, stop: int, delta: np.ndarray | None, out: np.ndarray, limit: float) -> bool:
        """Rows [start, stop) decoded, ΔW rows `delta` added, rounded into bfloat16 bits `out`
        in one pass (fused.py); whether every sum is below `limit` in magnitude."""
        cols = self.shape[1]
        return fused.native.add_4bit(self.packed, start * cols, self.code, self.absmax, self.blocksize,
                                     delta, out, limit, self.dtype == "BF16")

    def fill(self, start: int, stop: int, block: np.ndarray, scratch: np.ndarray) -> None:
        """Rows [start, stop) as float32 into `block` (shape (stop-start, cols)), rounded to the
        quant state's dtype; scratch: uint32 of the block's size."""
        cols = self.shape[1]
        flat = block.reshape(-1)
        self.decode(start * cols, stop * cols, flat)
        if self.dtype == "BF16":
            round_to_bf16_in_float32(flat, scratch.reshape(-1))
        elif self.dtype == "F16":
            np.copyto(flat, flat.astype(np.float16))
        # float32: the products themselves

    def decode(self, first: int, last: int, out: np.ndarray) -> None:
        """Elements [first, last) of the flattened weight into `out` (float32, unrounded):
        code value × its block's scale, one float32 product each."""
        bs = self.blocksize
        lo = min(last, -(-first // bs) * bs)  # whole blocks from here (bs is a multiple of 4)...
        hi = max(lo, last // bs * bs)  # ...to here
        if first < lo:
            self._nibbles(first, lo, out[: lo - first])
        for start in range(lo, hi, CHUNK):
            stop = min(start + CHUNK, hi)
            values = out[start - first: stop - first]
            np.take(self.four, self.pairs[start // 4: stop // 4], out=values.view("V16"))
            blocks = values.reshape(-1, bs)  # a view: scaled in place
            blocks *= self.absmax[start // bs: stop // bs, None]
        if hi < last:
            self._nibbles(hi, last, out[hi - first:])

    def _nibbles(self, first: int, last: int, out: np.ndarray) -> None:
        """A partial block, nibble by nibble (high nibble first in each byte)."""
        packed = self.packed[first // 2: (last + 1) // 2]
        codes = np.empty(packed.size * 2, dtype=np.uint8)
        np.right_shift(packed, 4, out=codes[0::2])
        np.bitwise_and(packed, 0x0F, out=codes[1::2])
        codes = codes[first % 2: first % 2 + last - first]
        np.multiply(self.code[codes], self.absmax[np.arange(first, last) // self.blocksize], out=out)


@functools.lru_cache(maxsize=8)
def _four_codes(code: bytes) -> np.ndarray:
    """(65536, 4) float32: the code values of the four nibbles of a little-endian uint16 of two
    packed bytes, in element order (high nibble first in each byte). Keyed by the code table's
    bytes: every weight of a model shares one table."""
    code = np.frombuffer(code, dtype=np.float32)
    v = np.arange(65536, dtype=np.uint32)
    return np.ascontiguousarray(np.stack([code[(v >> 4) & 15], code[v & 15], code[(v >> 12) & 15], code[(v >> 8) & 15]], axis=1))


def _round_into(values: np.ndarray, out: np.ndarray, dtype: str, scratch: np.ndarray) -> None:
    """float32 values rounded (nearest, ties to even) into `out`, held as `dtype` holds them."""
    if dtype == "BF16":
        round_to_bf16(values, out, scratch)
    else:
        np.copyto(out, values, casting="same_kind")


def _e4m3_table() -> np.ndarray:
    """The float32 value of every e4m3fn byte (bias 7, no infinities, S.1111.111 is NaN)."""
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent, mantissa = (codes >> 3) & 0xF, (codes & 0x7).astype(np.float64)
    normal = (1 + mantissa / 8) * np.exp2(exponent.astype(np.float64) - 7)
    subnormal = mantissa / 8 * 2.0 ** -6
    table = sign * np.where(exponent == 0, subnormal, normal)
    table[(codes & 0x7F) == 0x7F] = np.nan
    return table.astype(np.float32)


E4M3 = _e4m3_table()


def dequantize_fp8(stored: np.ndarray, scale_inv: np.ndarray, shape: tuple[int, ...], block: tuple[int, ...]) -> np.ndarray:
    values = E4M3[stored.reshape(shape)]
    values *= _expand(scale_inv.astype(np.float32, copy=False), shape, block)
    return values


def _expand(scales: np.ndarray, shape: tuple[int, ...], block: tuple[int, ...]) -> np.ndarray:
    """One scale per block, repeated over the block's elements (edge blocks cut to the shape)."""
    return np.repeat(np.repeat(scales, block[0], axis=0), block[1], axis=1)[: shape[0], : shape[1]]


def quantize_fp8(values: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """float32 (rows, cols) -> (e4m3 codes as uint8, float32 scale_inv per block): each block
    scaled so its largest magnitude is 448 (e4m3's largest), rounded to nearest, ties to even."""
    rows, cols = values.shape
    br, bc = -(-rows // block[0]), -(-cols // block[1])
    padded = np.zeros((br * block[0], bc * block[1]), dtype=np.float32)
    padded[:rows, :cols] = np.abs(values)
    amax = padded.reshape(br, block[0], bc, block[1]).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1)).astype(np.float32)
    return encode_e4m3(values / _expand(scale, values.shape, block)), scale


_POSITIVE = E4M3[:0x7F]  # codes 0..126: every finite non-negative value, increasing


def encode_e4m3(values: np.ndarray) -> np.ndarray:
    """Nearest e4m3 code, ties to the even code, magnitudes above 448 saturated."""
    magnitude = np.minimum(np.abs(values), np.float32(E4M3_MAX))
    upper = np.searchsorted(_POSITIVE, magnitude, side="left").clip(1, 0x7E)
    lower = upper - 1
    to_lower = magnitude - _POSITIVE[lower]
    to_upper = _POSITIVE[upper] - magnitude
    pick_upper = (to_upper < to_lower) | ((to_upper == to_lower) & (upper % 2 == 0))
    code = np.where(pick_upper, upper, lower).astype(np.uint8)
    code[magnitude == 0] = 0
    return code | np.where(np.signbit(values), np.uint8(0x80), np.uint8(0))
