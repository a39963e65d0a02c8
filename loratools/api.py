"""The public entry points for reading and writing adapters (re-exported by `loratools`)."""

from __future__ import annotations

import os
from pathlib import Path

from .adapter import Adapter
from .formats.peft_dir import read_adapter, write_adapter
from .hub import ADAPTER_PATTERNS, resolve


def load_adapter(spec: str | os.PathLike) -> Adapter:
    """Open an adapter from a directory, a .safetensors/.bin file (config beside it) or a Hub repo
    id (`org/name[@revision]`). Reads the config and the header only; tensors load on demand."""
    return read_adapter(resolve(spec, allow_patterns=ADAPTER_PATTERNS))


def save_adapter(adapter: Adapter, out: str | os.PathLike, force: bool = False) -> Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors), atomically;
    an existing `out` is replaced only with force=True."""
    return write_adapter(adapter, out, force=force)
