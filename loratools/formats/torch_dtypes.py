"""Safetensors dtype codes as torch dtypes (imports torch: only for code that loads tensors)."""

from __future__ import annotations

import torch

from ..errors import UnsupportedError

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
}


def torch_dtype(code: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[code]
    except KeyError:
        raise UnsupportedError(f"tensors of dtype {code} cannot be loaded by this torch") from None
