"""Safetensors dtype codes as torch dtypes (imports torch: only for code that loads tensors)."""

from __future__ import annotations

import torch

from ..errors import UnsupportedError
from .dtypes import DTYPES

# torch's dtype of every code of the table (all of them exist in the torch loratools pins)
TORCH_DTYPES = {code: getattr(torch, d.name) for code, d in DTYPES.items() if hasattr(torch, d.name)}


def torch_dtype(code: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[code]
    except KeyError:
        raise UnsupportedError(f"tensors of dtype {code} cannot be loaded by this torch") from None
