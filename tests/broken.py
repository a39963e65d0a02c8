"""Build broken adapters from a valid one by one mutation each (shared by the error tests)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

from tests.conftest import ADAPTERS

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def copy_adapter(tmp: Path, name: str = "llama-basic") -> Path:
    dst = tmp / name
    shutil.copytree(ADAPTERS / name, dst)
    return dst


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def edit_header(adapter: Path, edit) -> None:
    """Apply edit(header) -> header to the weights file, keeping the data buffer."""
    header, data = split_safetensors(adapter / WEIGHTS)
    write_safetensors(adapter / WEIGHTS, edit(header), data)


def drop_tensor(adapter: Path, key: str) -> None:
    """Remove one tensor and re-pack the buffer so the file stays well-formed."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter / WEIGHTS))
    del tensors[key]
    save_file(tensors, str(adapter / WEIGHTS), metadata={"format": "pt"})


def replace_tensors(adapter: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = edit(load_file(str(adapter / WEIGHTS)))
    save_file(tensors, str(adapter / WEIGHTS), metadata={"format": "pt"})


def edit_config(adapter: Path, edit) -> None:
    cfg = json.loads((adapter / CONFIG).read_text())
    (adapter / CONFIG).write_text(json.dumps(edit(cfg)))
