"""Tensor stores: a uniform, lazy view of named tensors, whether in a safetensors file, a legacy
pickle or memory. Shapes and dtypes come without torch; tensors are loaded on demand."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from ..errors import FormatError
from .safetensors_header import Header, read_header

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorMeta:
    dtype: str  # torch-style name: "float32", "bfloat16", ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class TensorStore:
    """Named tensors: `keys()`, `meta(key)` without loading, `get(key)` loads one tensor."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def meta(self, key: str) -> TensorMeta:
        raise NotImplementedError

    def get(self, key: str) -> "torch.Tensor":
        raise NotImplementedError


class SafetensorsStore(TensorStore):
    """A safetensors file: the header is parsed and checked when the store is made; each tensor
    is read from the memory-mapped file when asked for."""

    def __init__(self, path: str | os.PathLike, header: Header | None = None):
        self.path = os.fspath(path)
        self.header = header or read_header(self.path)
        self._handle = None

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def meta(self, key: str) -> TensorMeta:
        info = self.header.tensors[key]
        return TensorMeta(info.dtype_name, info.shape)

    def get(self, key: str) -> "torch.Tensor":
        from safetensors import SafetensorError, safe_open

        try:
            if self._handle is None:
                self._handle = safe_open(self.path, framework="pt", device="cpu")
            return self._handle.get_tensor(key)
        except SafetensorError as exc:
            raise FormatError(f"{os.path.basename(self.path)}: {exc}") from None


class MemoryStore(TensorStore):
    """Tensors already in memory (a legacy .bin, or an adapter built by convert/combine)."""

    def __init__(self, tensors: Mapping[str, "torch.Tensor"]):
        self.tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def meta(self, key: str) -> TensorMeta:
        t = self.tensors[key]
        return TensorMeta(str(t.dtype).removeprefix("torch."), tuple(t.shape))

    def get(self, key: str) -> "torch.Tensor":
        return self.tensors[key]


def load_pickled_tensors(path: str | os.PathLike) -> MemoryStore:
    """A legacy adapter_model.bin, read with torch.load(weights_only=True) and nothing else:
    a pickle that needs arbitrary objects is refused, never executed."""
    import pickle
    import re
    import warnings

    import torch

    name = os.path.basename(os.fspath(path))
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the verdict is what matters
            warnings.simplefilter("ignore")
            obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is long; keep the sentence that says what the pickle wanted.
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
        why = found.group(1).split(". ")[0].strip().rstrip(".") if found else "it needs more than plain tensors"
        raise FormatError(
            f"{name}: refused to unpickle ({why}); loratools loads .bin files with weights_only=True only. "
            "Re-save the adapter as safetensors with a trusted tool"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FormatError(f"{name}: not a readable torch checkpoint ({first[:200]})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise FormatError(f"{name}: expected a dict of name -> tensor, got {type(obj).__name__}")
    return MemoryStore(obj)
