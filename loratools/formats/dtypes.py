"""The one table of tensor dtypes: every other dtype map in loratools is derived from it.

Keyed by the safetensors code. `name` is torch's (and the adapter model's) spelling; `numpy` how
numpy holds the values (bfloat16 as its uint16 bits, FP8 as its byte); `exponent` the mask of a
float's exponent bits in that unsigned view (all ones: NaN or Inf). Plain data, no numpy or torch.
"""

from __future__ import annotations

from typing import NamedTuple


class DType(NamedTuple):
    size: int  # bytes per element
    name: str  # torch's name
    numpy: str | None  # numpy dtype string of the stored bits; None: numpy has no view of it
    exponent: int | None = None  # exponent mask of a float in its unsigned view
    unsigned: str | None = None  # that unsigned view


DTYPES: dict[str, DType] = {
    "F64": DType(8, "float64", "<f8", 0x7FF0000000000000, "<u8"),
    "F32": DType(4, "float32", "<f4", 0x7F800000, "<u4"),
    "F16": DType(2, "float16", "<f2", 0x7C00, "<u2"),
    "BF16": DType(2, "bfloat16", "<u2", 0x7F80, "<u2"),
    "F8_E4M3": DType(1, "float8_e4m3fn", "u1"),
    "F8_E5M2": DType(1, "float8_e5m2", "u1"),
    "I64": DType(8, "int64", "<i8"),
    "I32": DType(4, "int32", "<i4"),
    "I16": DType(2, "int16", "<i2"),
    "I8": DType(1, "int8", "i1"),
    "U8": DType(1, "uint8", "u1"),
    "U16": DType(2, "uint16", None),
    "U32": DType(4, "uint32", None),
    "U64": DType(8, "uint64", None),
    "BOOL": DType(1, "bool", None),
}

FLOAT_CODES = frozenset(code for code, d in DTYPES.items() if code.startswith(("F", "BF")))
# The floats a merge computes in and writes (FP8 is only ever a stored, quantized format).
WIDE_FLOAT_CODES = ("F32", "F16", "BF16", "F64")
CODE_OF_NAME = {DTYPES[code].name: code for code in WIDE_FLOAT_CODES}  # --dtype's names -> codes
FLOAT_NAMES = frozenset(CODE_OF_NAME)  # the adapter model's float dtypes (torch names)
# numpy's view of the bits merges read and write (bf16 as uint16): the numpy kernel's dtypes.
HELD = {code: DTYPES[code].numpy for code in ("BF16", "F16", "F32")}
