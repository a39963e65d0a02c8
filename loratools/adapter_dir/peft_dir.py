"""PEFT adapter directories: adapter_config.json + adapter_model.safetensors (or legacy .bin)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..adapter import Adapter
from ..config import CONFIG_NAME, AdapterConfig, config_json, read_raw_config
from ..errors import FormatError, InputNotFoundError
from .adalora import PEFT_TYPE, adalora_problems, as_lora, is_adalora
from ..formats.atomic import atomic_dir, refuse_overlap, write_bytes
from ..formats.tensors import MemoryStore, SafetensorsStore, TensorStore, load_pickled_tensors, refuse_non_finite

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


def adapter_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """(config, weights) for an adapter directory, or for a weights file with its config beside it."""
    path = Path(path)
    if path.is_dir():
        for name in (SAFETENSORS_NAME, BIN_NAME):
            if (path / name).exists():  # read_header / load_pickled_tensors refuse what is not a regular file
                return path / CONFIG_NAME, path / name
        raise InputNotFoundError(f"{path}: no {SAFETENSORS_NAME} (or legacy {BIN_NAME}) in this directory")
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file or directory")
    if path.suffix not in (".safetensors", ".bin"):
        raise FormatError(f"{path}: expected an adapter directory, a .safetensors or a .bin file")
    return path.parent / CONFIG_NAME, path


def open_tensors(weights: Path) -> TensorStore:
    if weights.suffix == ".bin":
        return load_pickled_tensors(weights)
    return SafetensorsStore(weights)


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Open a local adapter: reads the config and the safetensors header; tensors load on demand.
    An AdaLoRA adapter is read as the plain LoRA it equals (adapter_dir/adalora.py)."""
    config_path, weights = adapter_files(path)
    raw = read_raw_config(config_path)
    if is_adalora(raw):
        return read_adalora(raw, open_tensors(weights), source=str(path), weights_path=str(weights))
    config = AdapterConfig.from_dict(raw)
    return Adapter(config, open_tensors(weights), source=str(path), weights_path=str(weights))


def read_adalora(raw: dict, store: TensorStore, source: str, weights_path: str | None = None, collect_problems: bool = False) -> Adapter:
    problems = adalora_problems(raw, store)
    if problems and not collect_problems:
        raise problems[0]
    if problems:  # validate: report them, as findings of an adapter of no modules
        adapter = Adapter(AdapterConfig.from_dict({"peft_type": "LORA", "r": 1, "target_modules": []}), MemoryStore({}),
                          source=source, weights_path=weights_path, collect_problems=True)
        adapter.problems.extend((None, p) for p in problems)
    else:
        lora, tensors, pruned = as_lora(raw, store)
        adapter = Adapter(AdapterConfig.from_dict(lora), MemoryStore(tensors), source=source, weights_path=weights_path,
                          collect_problems=collect_problems)
        adapter.pruned = pruned
    adapter.origin = PEFT_TYPE
    return adapter


def write_adapter(adapter: Adapter, out: str | os.PathLike, force: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write `adapter` as a PEFT directory (config + safetensors), atomically. `inputs`: paths the
    adapter was made from, which `out` may not overlap. Every command that writes an adapter comes
    here, so every one refuses NaN/Inf (`non-finite`) before anything is created."""
    from safetensors.torch import save

    refuse_overlap(out, [*inputs, *adapter.input_paths()])
    # Load and check everything before creating anything, so an error leaves no output behind.
    tensors = _own_storage(adapter.state_dict())
    refuse_non_finite(tensors, out)
    # Serialized in memory (an adapter is small) and written by our own checked writes: a short
    # write, a full disk or a lost byte is one line, whatever safetensors' own I/O would do.
    data = save(tensors, metadata={"format": "pt"})
    with atomic_dir(out, force=force) as tmp:
        write_bytes(tmp / CONFIG_NAME, config_json(adapter.config.raw).encode("utf-8"))
        write_bytes(tmp / SAFETENSORS_NAME, data)
    return Path(out)


def _own_storage(tensors: dict) -> dict:
    """Contiguous tensors that each own their memory: safetensors refuses tensors that share
    storage (views made by slicing or reusing one factor for several modules)."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        storage = t.untyped_storage()
        if not t.is_contiguous() or storage.nbytes() != t.nbytes or storage.data_ptr() in seen:
            t = t.contiguous().clone()
            storage = t.untyped_storage()
        seen.add(storage.data_ptr())
        out[key] = t
    return out
