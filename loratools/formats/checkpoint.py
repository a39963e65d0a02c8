"""Base checkpoints in safetensors: one `model.safetensors`, shards listed in
`model.safetensors.index.json`, or a single .safetensors file. Only headers are read here."""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, FormatError, InputNotFoundError
from .files import not_a_file
from .json_text import read_json_file
from .quantized import QuantizedWeight, companions, find_quantized
from .safetensors_header import Header, TensorInfo, read_header
from .tensors import SafetensorsStore

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Weights in other formats are never copied into a merged output: they would hold the unmerged
# weights under a name transformers might load.
OTHER_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.ckpt", "*.gguf", "*.onnx", "*.ot")


@dataclass
class Checkpoint:
    path: Path  # the directory, or the single file
    is_file: bool  # a bare .safetensors file, not a model directory
    shards: dict[str, Header]  # shard file name (relative to the directory) -> header, in index order
    weight_map: dict[str, str]  # tensor name -> shard file name
    index: dict | None = None  # the parsed index file, when sharded
    config: dict | None = None  # config.json, when present
    other_files: list[str] = field(default_factory=list)  # relative paths copied as they are
    skipped_files: list[str] = field(default_factory=list)  # other-format weights, not copied
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # weight name -> how it is stored
    quant_parts: set[str] = field(default_factory=set)  # the tensors that belong to quantized weights

    def info(self, name: str) -> TensorInfo:
        """A tensor as the model sees it: a quantized weight has its dequantized shape and dtype
        (its offsets stay those of the stored, packed tensor)."""
        weight = self.quantized.get(name)
        stored = self.shards[self.weight_map[weight.stored if weight else name]].tensors[weight.stored if weight else name]
        if weight is None:
            return stored
        return TensorInfo(weight.dtype, weight.shape, stored.start, stored.end)

    def file(self, shard: str) -> Path:
        return self.path if self.is_file else self.path / shard

    def store(self, name: str) -> SafetensorsStore:
        """The shard holding tensor `name`, for reading it (plain reads, no torch needed); an
        MXFP4 weight's: the shard of its blocks."""
        shard = self.weight_map[self.quantized[name].stored if name in self.quantized else name]
        return SafetensorsStore(self.file(shard), self.shards[shard])

    def describe_quantization(self) -> str | None:
        """E.g. "nf4, double quant, blocksize 64" (several kinds joined by "; "), or None."""
        kinds = dict.fromkeys(w.describe() for w in self.quantized.values())
        return "; ".join(kinds) or None

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map or name in self.quantized  # an MXFP4 weight is stored as its parts


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise FormatError(f"{path}: expected a .safetensors file or a model directory")
        header = read_header(path)
        return _with_quantization(Checkpoint(path, True, {path.name: header}, {name: path.name for name in header.tensors}))
    if not path.is_dir():
        if path.exists():
            raise not_a_file(str(path), os.stat(path).st_mode)
        raise InputNotFoundError(f"{path}: no such file or directory")
    config = _read_json(path / "config.json") if _present(path / "config.json") else None
    if _present(path / INDEX_NAME):
        index = _read_json(path / INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConfigError(f"{INDEX_NAME}: no valid weight_map (tensor name -> shard file)")
        shards: dict[str, Header] = {}
        for shard in dict.fromkeys(weight_map.values()):
            if os.path.isabs(shard) or ".." in Path(shard).parts:
                raise ConfigError(f"{INDEX_NAME}: shard path {shard!r} points outside the checkpoint")
            if not _present(path / shard):
                raise InputNotFoundError(f"{path / shard}: shard listed in {INDEX_NAME} is missing")
            shards[shard] = read_header(path / shard)
        for name, shard in weight_map.items():
            if name not in shards[shard].tensors:
                raise FormatError(f"{INDEX_NAME}: lists {name!r} in {shard}, but that shard has no such tensor")
        # Tensors a shard holds but the index does not list are carried along unchanged.
        full_map = {name: shard for shard, header in shards.items() for name in header.tensors}
        full_map.update(weight_map)
        used = {INDEX_NAME, *shards}
        checkpoint = Checkpoint(path, False, shards, full_map, index=index, config=config)
    elif _present(path / SINGLE_NAME):
        header = read_header(path / SINGLE_NAME)
        used = {SINGLE_NAME}
        checkpoint = Checkpoint(path, False, {SINGLE_NAME: header}, {n: SINGLE_NAME for n in header.tensors}, config=config)
    else:
        raise InputNotFoundError(
            f"{path}: no {SINGLE_NAME} or {INDEX_NAME} (loratools merges safetensors checkpoints)"
        )
    for rel in _files(path):
        if rel in used:
            continue
        if any(fnmatch.fnmatch(Path(rel).name, pattern) for pattern in OTHER_WEIGHTS):
            checkpoint.skipped_files.append(rel)
        else:
            checkpoint.other_files.append(rel)
    return _with_quantization(checkpoint)


def _with_quantization(checkpoint: Checkpoint) -> Checkpoint:
    checkpoint.quantized = find_quantized(checkpoint.shards, checkpoint.weight_map, checkpoint.config, checkpoint.file)
    checkpoint.quant_parts = companions(checkpoint.quantized)
    return checkpoint


def _new_dir(path: str, seen: set) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    if (st.st_dev, st.st_ino) in seen:
        return False
    seen.add((st.st_dev, st.st_ino))
    return True


def _present(path: Path) -> bool:
    """There is something at `path` (the readers refuse what is not a regular file, by name)."""
    return path.exists() or path.is_symlink()


def _files(root: Path) -> list[str]:
    """Every file under `root` (merge copies them into OUT): a FIFO, a device or a dangling symlink
    among them is refused here, as copying one would block, never end, or fail half-way. Symlinked
    directories are followed (the Hub cache), each directory once: a link to its own parent is no loop."""
    out = []
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and _new_dir(os.path.join(dirpath, d), seen))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            try:
                mode = os.stat(full).st_mode
            except OSError:
                raise InputNotFoundError(f"{full}: a dangling symlink in the checkpoint (its target is gone)") from None
            if not stat.S_ISREG(mode):
                raise not_a_file(full, mode)
            out.append(os.path.relpath(full, root))
    return out


def _read_json(path: Path) -> dict:
    obj = read_json_file(path, error=ConfigError)
    if not isinstance(obj, dict):
        raise ConfigError(f"{path.name}: expected a JSON object")
    return obj
