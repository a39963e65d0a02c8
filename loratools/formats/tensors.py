"""Tensor stores: a uniform, lazy view of named tensors, whether in a safetensors file, a legacy
pickle or memory. Shapes and dtypes come without torch; tensors are loaded on demand."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from ..errors import FormatError
from .dtypes import DTYPES
from .files import open_regular, read_error
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

    def array(self, key: str):
        """The tensor as a numpy array (bfloat16 widened to float32, which is exact)."""
        tensor = self.get(key)
        return (tensor.float() if tensor.dtype.is_floating_point and tensor.dtype.itemsize < 4 else tensor).numpy()

    def finite(self, key: str) -> bool:
        """No NaN or Inf in the tensor (always true for integer tensors)."""
        import torch

        tensor = self.get(key)
        return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())

    def check_unchanged(self) -> None:
        """Raise if the file behind the store changed since it was opened (nothing to do in memory)."""


# Float formats as bit fields: (unsigned view, exponent mask). A value is NaN/Inf when its exponent
# bits are all ones.
_BITS = {code: (d.unsigned, d.exponent) for code, d in DTYPES.items() if d.exponent}


# Safetensors codes numpy reads natively (BF16 by widening; see SafetensorsStore.array).
_NUMPY_DTYPES = {code: d.numpy for code, d in DTYPES.items() if d.numpy and not code.startswith("F8")}


class SafetensorsStore(TensorStore):
    """A safetensors file: the header is parsed and checked when the store is made; each tensor
    is read when asked for, with plain reads rather than a memory map, so a file truncated by
    someone else meanwhile is a clean error (a short read), never a SIGBUS."""

    def __init__(self, path: str | os.PathLike, header: Header | None = None):
        self.path = os.fspath(path)
        self.header = header or read_header(self.path)

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def meta(self, key: str) -> TensorMeta:
        info = self.header.tensors[key]
        return TensorMeta(info.dtype_name, info.shape)

    def raw(self, key: str):
        """The tensor's bytes, as stored (a numpy uint8 array: allocated without zero-filling)."""
        import numpy as np

        info = self.header.tensors[key]
        self.header.check_unchanged()
        data = np.empty(info.end - info.start, dtype=np.uint8)
        with open_regular(self.path) as fh:
            try:
                fh.seek(self.header.data_start + info.start)
                read = fh.readinto(memoryview(data)) if data.size else 0
            except OSError as exc:
                raise read_error(self.path, exc) from None
        if read != data.size:
            raise FormatError(f"{os.path.basename(self.path)}: ended early while reading {key} (truncated meanwhile?)", code="input-changed")
        return data

    def array(self, key: str):
        """Read with numpy alone (no torch import): what `loratools svd` needs."""
        import numpy as np

        info = self.header.tensors[key]
        if info.dtype not in _NUMPY_DTYPES:
            return super().array(key)
        data = self.raw(key)
        if info.dtype == "BF16":  # the top half of a float32: widen by a shift, exactly
            return (data.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
        return data.view(_NUMPY_DTYPES[info.dtype]).reshape(info.shape)

    def get(self, key: str) -> "torch.Tensor":
        import torch

        from .torch_dtypes import torch_dtype

        info = self.header.tensors[key]
        data = self.raw(key)
        dtype = torch_dtype(info.dtype)
        if not data.size:
            return torch.empty(info.shape, dtype=dtype)
        return torch.from_numpy(data).view(dtype).reshape(info.shape)

    def finite(self, key: str) -> bool:
        """Checked on the raw bits with numpy: no torch import, no dtype conversion."""
        return raw_values(self, key)[0]

    def check_unchanged(self) -> None:
        self.header.check_unchanged()


def raw_values(store: SafetensorsStore, key: str) -> tuple[bool, bool]:
    """(no NaN/Inf, not all zero) for a tensor of a safetensors file, from its bits."""
    import numpy as np

    info = store.header.tensors[key]
    if info.dtype not in _BITS or info.end == info.start:
        return True, info.end != info.start
    unsigned, exponent = _BITS[info.dtype]
    bits = store.raw(key).view(unsigned)
    exp_mask = np.array(exponent, dtype=unsigned)
    finite = not np.any((bits & exp_mask) == exp_mask)
    nonzero = bool(np.any(bits << np.array(1, dtype=unsigned)))  # drop the sign bit: -0 is zero too
    return finite, nonzero


def refuse_non_finite(tensors, out: str | os.PathLike) -> None:
    """The one finiteness rule of every writer: raise (`non-finite`, naming the tensor) if a float
    tensor about to be written to `out` holds NaN or Inf. `tensors`: a mapping or (name, tensor)
    pairs; torch tensors or numpy arrays (torch is not imported for numpy arrays). Call it before
    creating anything."""
    import numpy as np

    for key, t in tensors.items() if isinstance(tensors, Mapping) else tensors:
        if isinstance(t, np.ndarray):
            bad = t.dtype.kind in "fc" and not np.isfinite(t).all()
        else:
            import torch

            bad = (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
        if bad:
            raise FormatError(f"{key} contains NaN or Inf: loratools writes only finite tensors (an input holds NaN/Inf, "
                              f"or a weight or scaling overflowed); nothing was written to {out}", code="non-finite")


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
    a pickle that needs arbitrary objects is refused, never executed. Whatever the file holds
    that is not a dict of name -> tensor is one FormatError (`pickle-refused`)."""
    import pickle
    import re
    import warnings

    import torch

    name = os.path.basename(os.fspath(path))
    with open_regular(path) as fh:
        _refuse_zip_bomb(fh, name)
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols; the verdict is what matters
                warnings.simplefilter("ignore")
                obj = torch.load(fh, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's message is long; keep the sentence that says what the pickle wanted.
            found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
            why = found.group(1).split(". ")[0].strip().rstrip(".") if found else "it needs more than plain tensors"
            raise _refused(f"{name}: refused to unpickle ({why}); loratools loads .bin files with weights_only=True only. "
                           "Re-save the adapter as safetensors with a trusted tool") from None
        except OSError as exc:
            raise read_error(os.fspath(path), exc) from None
        except Exception as exc:  # noqa: BLE001 - any bytes reach torch's unpickler: KeyError, IndexError, struct.error...
            first = (str(exc).strip().splitlines() or [""])[0][:200] or type(exc).__name__
            raise _refused(f"{name}: not a torch checkpoint of tensors ({type(exc).__name__}: {first})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise _refused(f"{name}: expected a dict of name -> tensor, got {type(obj).__name__}")
    return MemoryStore(obj)


def _refused(message: str) -> FormatError:
    return FormatError(message, code="pickle-refused")


def _refuse_zip_bomb(fh, name: str) -> None:
    """torch.save writes an uncompressed zip: its members add up to about the file's size. A member
    that claims to expand far beyond that is a zip bomb, refused before torch reads it."""
    import zipfile

    try:
        if zipfile.is_zipfile(fh):
            with zipfile.ZipFile(fh) as archive:
                members = archive.infolist()
        else:
            members = None
        fh.seek(0)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _refused(f"{name}: not a readable torch checkpoint ({exc})") from None
    if members is None:
        return
    size = os.fstat(fh.fileno()).st_size
    expanded = sum(m.file_size for m in members)
    if expanded > 2 * size + (1 << 20) or any(m.compress_type != zipfile.ZIP_STORED for m in members):
        raise _refused(f"{name}: zip members expand to {expanded:,} bytes from a {size:,}-byte file (torch.save never "
                       "compresses); refused")
