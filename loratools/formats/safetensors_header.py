"""Read and check a safetensors header without torch.

A safetensors file is: 8 bytes (little-endian u64 N), N bytes of JSON header, then the data
buffer. Reading only the header makes opening an adapter O(number of tensors), lets `info` and
`--help` run without importing torch, and lets us reject a broken file with a precise message
before any tensor is read.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

from ..errors import FormatError
from .dtypes import DTYPES, FLOAT_CODES as FLOAT_DTYPES  # noqa: F401  (re-exported)
from .files import open_regular, read_error
from .json_text import parse_json


# The reference implementation refuses headers above 100 MB; so do we, before allocating.
MAX_HEADER_BYTES = 100_000_000
# Far above any real checkpoint or adapter (a 671B MoE with LoRA on every expert has ~100k).
MAX_TENSORS = 200_000


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # header code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # offsets into the data buffer
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype_name(self) -> str:
        return DTYPES[self.dtype].name


@dataclass(frozen=True)
class Header:
    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # byte offset of the data buffer in the file
    file_size: int
    stamp: tuple[int, ...] = ()  # (inode, size, mtime_ns) when the header was read

    def check_unchanged(self) -> None:
        """Raise if the file was replaced or rewritten since its header was read: reading on would
        mix two versions of it (or fault on a mapping of a truncated file)."""
        if self.stamp and file_stamp(self.path) != self.stamp:
            raise FormatError(
                f"{os.path.basename(self.path)}: changed on disk while loratools was reading it; run again once it is stable",
                code="input-changed",
            )


def file_stamp(path: str | os.PathLike) -> tuple[int, ...]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1,)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_header(path: str | os.PathLike) -> Header:
    """Parse and fully check the header of a safetensors file (reads only the header bytes)."""
    path = os.fspath(path)
    name = os.path.basename(path)
    with open_regular(path) as fh:
        try:
            st = os.fstat(fh.fileno())
            file_size, stamp = st.st_size, (st.st_ino, st.st_size, st.st_mtime_ns)
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise FormatError(f"{name}: file is {file_size} bytes, too short to be safetensors", code="st-too-short")
            (n,) = struct.unpack("<Q", prefix)
            if n + 8 > file_size:
                raise FormatError(
                    f"{name}: header length {n} does not fit in a {file_size}-byte file (truncated or not safetensors)",
                    code="st-header-length",
                )
            if n > MAX_HEADER_BYTES:
                raise FormatError(
                    f"{name}: the header is {n:,} bytes, more than the {MAX_HEADER_BYTES:,} the safetensors format "
                    "allows (its reference implementation refuses it too); refused",
                    code="too-large",
                )
            raw = fh.read(n)
        except OSError as exc:
            raise read_error(path, exc) from None
    if len(raw) < n:
        raise FormatError(f"{name}: ended early while reading the header (truncated meanwhile?)", code="input-changed")
    header = parse_header(raw, file_size, name=name, path=path)
    return Header(header.path, header.tensors, header.metadata, header.data_start, header.file_size, stamp)


def parse_header(raw: bytes, file_size: int, *, name: str, path: str = "") -> Header:
    """Check a header's JSON bytes against the size of the file they came from."""
    # Count entries before parsing: a header of a million empty tensors parses into gigabytes.
    entries = raw.count(b'"data_offsets"')
    if entries > MAX_TENSORS:
        raise FormatError(f"{name}: header lists {entries} tensors (more than {MAX_TENSORS}); refused", code="st-too-many-tensors")
    try:
        obj = parse_json(raw)
    except ValueError as exc:
        raise FormatError(f"{name}: header is not valid JSON ({exc})", code="st-header-json") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{name}: header is not a JSON object", code="st-header-json")
    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{name}: __metadata__ must map strings to strings", code="st-metadata")
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for key, entry in obj.items():
        tensors[key] = _check_entry(name, key, entry)
    # The data buffer must be covered exactly: no two tensors share bytes, no gaps, no tail.
    ordered = sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end))
    for (prev_key, prev), (key, info) in zip(ordered, ordered[1:]):
        if info.start < prev.end and info.end > info.start:
            raise FormatError(f"{name}: tensor {key!r} overlaps tensor {prev_key!r} in the data buffer", code="st-overlap")
    position = 0
    for key, info in ordered:
        if info.start != position:
            raise FormatError(f"{name}: tensor {key!r} leaves a gap before it (offset {info.start}, expected {position})", code="st-offsets")
        position = info.end
    if position != data_len:
        if position > data_len:
            raise FormatError(f"{name}: truncated: tensors need {position} data bytes, file has {data_len}", code="st-truncated")
        raise FormatError(f"{name}: {data_len - position} trailing bytes after the last tensor", code="st-trailing-bytes")
    return Header(path=path, tensors=tensors, metadata=metadata, data_start=data_start, file_size=file_size)


def _check_entry(name: str, key: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise FormatError(f"{name}: header entry {key!r} is not an object", code="st-header-json")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"{name}: tensor {key!r} has unknown dtype {dtype!r}", code="st-dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise FormatError(f"{name}: tensor {key!r} has an invalid shape {shape!r}", code="st-shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise FormatError(f"{name}: tensor {key!r} has invalid data_offsets {offsets!r}", code="st-offsets")
    info = TensorInfo(dtype=dtype, shape=tuple(shape), start=offsets[0], end=offsets[1])
    expected = info.numel * DTYPES[dtype].size
    if info.end - info.start != expected:
        raise FormatError(
            f"{name}: tensor {key!r} spans {info.end - info.start} bytes but {dtype}{list(shape)} needs {expected}",
            code="st-offsets",
        )
    return info
