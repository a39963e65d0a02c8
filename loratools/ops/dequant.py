"""Quantized weights to float32 and back, with numpy (no torch, no GPU).

bitsandbytes 4-bit: the value of element i is quant_map[code_i] * absmax[i // blocksize], codes
packed two per byte, high nibble first, over the flattened weight. With double quant, absmax is
itself nested_quant_map[absmax_i] * nested_absmax[i // nested_blocksize] + nested_offset. Each
product is a float32, which bitsandbytes then rounds to its quant state's dtype: that rounded
value is the weight the 4-bit model computes with, so it is what `dequantize_bnb` returns
(widened back to float32, exactly). Checked bit for bit against
`bitsandbytes.functional.dequantize_4bit` in the tests.

FP8 e4m3 with block scales: value = e4m3(code) * scale_inv[row // block_rows, col // block_cols],
in float32 (as DeepSeek's and transformers' reference dequantization compute it).
"""

from __future__ import annotations

import numpy as np

from ..formats.checkpoint import Checkpoint
from ..formats.quantized import QuantizedWeight
from ..formats.tensors import SafetensorsStore

E4M3_MAX = 448.0


def read_parts(checkpoint: Checkpoint, weight: QuantizedWeight) -> dict[str, np.ndarray]:
    """The small tensors a quantized weight needs beside its codes (scales, code maps)."""
    out = {}
    for role, name in weight.parts.items():
        if role != "state":
            shard = checkpoint.weight_map[name]
            out[role] = SafetensorsStore(checkpoint.file(shard), checkpoint.shards[shard]).array(name)
    return out


def dequantize(weight: QuantizedWeight, stored: np.ndarray, parts: dict[str, np.ndarray]) -> np.ndarray:
    """The weight in float32, shape weight.shape. stored: the quantized tensor's bytes (uint8)."""
    if weight.scheme == "fp8":
        return dequantize_fp8(stored, parts["scale_inv"], weight.shape, weight.block)
    code = parts["quant_map"].reshape(-1).astype(np.float32)
    if weight.scheme == "fp4" and code[8] == 0:
        code[8] = -0.0  # fp4's code 8 is sign bit + zero: bitsandbytes' kernels give -0.0 there
    return dequantize_bnb(stored, bnb_absmax(weight, parts), code, weight.block[0], weight.shape, weight.dtype)


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


def dequantize_bnb(packed: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int,
                   shape: tuple[int, ...], dtype: str) -> np.ndarray:
    numel = int(np.prod(shape, dtype=np.int64))
    packed = packed.reshape(-1)
    codes = np.empty(packed.size * 2, dtype=np.uint8)
    np.right_shift(packed, 4, out=codes[0::2])
    np.bitwise_and(packed, 0x0F, out=codes[1::2])
    values = code[codes[:numel]]
    full = numel // blocksize * blocksize
    blocks = values[:full].reshape(-1, blocksize)  # a view: scaled in place
    blocks *= absmax[: full // blocksize, None]
    if full < numel:
        values[full:] *= absmax[full // blocksize]
    return round_to(values, dtype).reshape(shape)


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to bfloat16/float16 (nearest, ties to even) and widened back; in place when it can."""
    if dtype == "BF16":
        bits = values.view(np.uint32)
        lsb = (bits >> 16) & 1
        bits += np.uint32(0x7FFF) + lsb
        bits &= np.uint32(0xFFFF0000)
        return values
    if dtype == "F16":
        return values.astype(np.float16).astype(np.float32)
    return values


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
