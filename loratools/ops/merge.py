"""Merge an adapter into base weights, streaming, with the semantics of PEFT's merge_and_unload.

Two phases. `plan_merge` (merge_plan.py) reads headers only: it maps every adapter module and extra tensor onto
a base tensor, checks shapes and dtypes, and fails before anything is written. `merge` then
streams the base tensor by tensor: untouched tensors are copied byte for byte; touched ones are
loaded, changed in float32 on the chosen device and rounded once into the output dtype. At most
one tensor (plus its float32 working copy) is in memory at a time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..arch import Layout
from ..errors import LoraToolsError, ShapeError, UsageError
from ..formats.atomic import atomic_dir, atomic_file, refuse_overlap
from ..formats.checkpoint import INDEX_NAME
from ..formats.safetensors_header import DTYPES, FLOAT_DTYPES
from ..formats.safetensors_writer import StreamingSafetensorsWriter
from ..formats.torch_dtypes import TORCH_DTYPES
from .merge_plan import DTYPE_CODES, MergePlan, TensorOps, plan_merge  # noqa: F401  (plan_merge: public here too)

# ---- execution ------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return dev


@dataclass
class MergeReport:
    base: str
    adapter: str
    out: str
    device: str
    shards: int
    tensors: int
    tensors_changed: int  # by a LoRA ΔW, DoRA or lora_bias
    tensors_replaced: int  # by modules_to_save, trained biases, saved embeddings
    bytes_written: int
    seconds: float
    skipped_files: list[str]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def merge_checkpoint(
    plan: MergePlan,
    out: str | os.PathLike,
    device: str = "auto",
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MergeReport:
    """Execute a plan: write OUT (a directory mirroring BASE, or a single file) atomically."""
    started = time.perf_counter()
    dev = resolve_device(device)
    base = plan.base
    out = Path(out)
    refuse_overlap(out, [base.path, *plan.adapter.input_paths()])
    written = 0
    if progress:
        total = sum(h.file_size - h.data_start for h in base.shards.values())
        progress = _ProgressAdapter(progress, total)
    # Output files get the permissions of the files they mirror (mkstemp/mkdtemp would give 0600/0700).
    if base.is_file:
        with atomic_file(out, force=force, mode=_mode(base.path)) as tmp:
            written += _write_shard(plan, base.path, next(iter(base.shards)), tmp, dev, progress)
            _require_unchanged(plan)
    else:
        with atomic_dir(out, force=force, mode=_mode(base.path)) as tmp:
            for shard in base.shards:
                (tmp / shard).parent.mkdir(parents=True, exist_ok=True)
                written += _write_shard(plan, base.path / shard, shard, tmp / shard, dev, progress)
                os.chmod(tmp / shard, _mode(base.path / shard))
            if base.index is not None:
                (tmp / INDEX_NAME).write_text(_index_json(plan))
                os.chmod(tmp / INDEX_NAME, _mode(base.path / INDEX_NAME))
            for rel in base.other_files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(base.path / rel, tmp / rel)  # follows Hub cache symlinks
                os.chmod(tmp / rel, _mode(base.path / rel))
            if plan.out_dtype and (tmp / "config.json").is_file():
                _record_dtype(tmp / "config.json", plan.out_dtype)
            _require_unchanged(plan)
    changed = sum(1 for o in plan.ops.values() if o.modules or o.lora_biases)
    replaced = sum(1 for o in plan.ops.values() if o.replace_key and not (o.modules or o.lora_biases))
    return MergeReport(
        base=str(base.path),
        adapter=str(plan.adapter.source),
        out=str(out),
        device=str(dev),
        shards=len(base.shards),
        tensors=len(base.weight_map),
        tensors_changed=changed,
        tensors_replaced=replaced,
        bytes_written=written,
        seconds=round(time.perf_counter() - started, 3),
        skipped_files=list(base.skipped_files),
    )


def _mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def _require_unchanged(plan: MergePlan) -> None:
    """Every input is as it was when planned; otherwise OUT could mix two versions of it."""
    for header in plan.base.shards.values():
        header.check_unchanged()
    plan.adapter.tensors.check_unchanged()


class _ProgressAdapter:
    """Calls the user's progress(done_bytes, total_bytes) after each tensor."""

    def __init__(self, callback: Callable[[int, int], None], total: int):
        self.callback, self.total, self.done = callback, total, 0

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        self.callback(self.done, self.total)


def _out_entries(plan: MergePlan, shard: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, output dtype code, shape) for every tensor of a shard, in file order."""
    header = plan.base.shards[shard]
    names = sorted(header.tensors, key=lambda n: header.tensors[n].start)  # sequential reads
    entries = []
    for name in names:
        info = header.tensors[name]
        dtype = plan.out_dtype if plan.out_dtype and info.dtype in FLOAT_DTYPES else info.dtype
        entries.append((name, dtype, info.shape))
    return entries


class _Buffers:
    """Reusable byte buffers: allocating (and page-faulting) fresh memory for every tensor costs
    more than the arithmetic of a merge. Grows to the largest tensor touched, then stays."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, slot: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < n:
            buf = self._buffers[slot] = torch.empty(n, dtype=torch.uint8)
        return buf[:n].view(dtype).view(shape)


ROW_BLOCK_BYTES = 1 << 20  # float32 rows processed per step: small enough to stay in cache


def _write_shard(plan: MergePlan, src: Path, shard: str, dst: Path, dev: torch.device, progress) -> int:
    header = plan.base.shards[shard]
    entries = _out_entries(plan, shard)
    buffers = _Buffers()
    header.check_unchanged()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        writer = StreamingSafetensorsWriter(fout, entries, header.metadata or {"format": "pt"})
        for name, dtype, shape in entries:
            info = header.tensors[name]
            ops = plan.ops.get(name)
            if ops is None and dtype == info.dtype:
                writer.copy_from(name, fin, header.data_start + info.start)
            else:
                tensor = _read_tensor(fin, header.data_start + info.start, info.dtype, shape, buffers)
                out = buffers.get("out", TORCH_DTYPES[dtype], shape)
                if ops is None:
                    out.copy_(tensor)
                else:
                    _apply(plan, ops, tensor, _Checked(out, name), dev)
                writer.write(name, out.view(torch.uint8).reshape(-1).numpy())
            if progress:
                progress(info.end - info.start)
        writer.close()
        fout.flush()
        return fout.tell()


def _read_tensor(fh, start: int, dtype: str, shape: tuple[int, ...], buffers: _Buffers) -> torch.Tensor:
    tensor = buffers.get("in", TORCH_DTYPES[dtype], shape)
    raw = tensor.view(torch.uint8).reshape(-1)
    fh.seek(start)
    if raw.numel() and fh.readinto(raw.numpy()) != raw.numel():
        raise ShapeError(f"{getattr(fh, 'name', 'base')}: ended early (truncated shard?)")
    return tensor


class _Checked:
    """The output tensor of one merge step. Every store into it is checked for NaN/Inf right
    after rounding (a large ΔW can overflow float16), block by block while the block is still in
    cache: a separate pass over the whole tensor would cost a third of the merge."""

    def __init__(self, out: torch.Tensor, name: str):
        self.tensor, self.name = out, name

    def store(self, value: torch.Tensor, rows: slice = slice(None)) -> None:
        target = self.tensor[rows]
        target.copy_(value)
        if not target.is_floating_point() or target.numel() == 0:
            return
        # min and max propagate NaN and show ±Inf: one fast reduction (isfinite is ~15x slower)
        low, high = (float(v) for v in torch.aminmax(target))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise LoraToolsError(f"merged {self.name} is not finite (overflows {str(target.dtype)[6:]}?); nothing was written",
                                 code="non-finite")


def _apply(plan: MergePlan, ops: TensorOps, base: torch.Tensor, out: _Checked, dev: torch.device) -> None:
    """Store into `out` (the output dtype) the base tensor after the plan's ops."""
    adapter = plan.adapter
    if ops.replace_key is not None:
        # PEFT loads a saved tensor into the existing parameter, i.e. in the base's dtype.
        base = adapter.tensor(ops.replace_key).to(base.dtype)
    if ops.rows:
        base = base.clone()
        for tokens in ops.rows:  # PEFT: index_copy of the trained rows, cast to the base dtype
            base[list(tokens.indices)] = adapter.tensor(tokens.key).to(base.dtype)
    if not (ops.modules or ops.lora_biases):
        out.store(base)
        return
    low_rank = []  # (L, R, s): ΔW = s·L@R in the base tensor's own orientation
    for module in ops.modules:
        a, b = (t.to(device=dev, dtype=torch.float32) for t in adapter.factors(module.path))
        s = module.scaling * plan.scale
        if module.diag_key is not None:
            diag = adapter.tensor(module.diag_key).to(device=dev, dtype=torch.float32)
            out.store(_kasa(base.to(device=dev, dtype=torch.float32), a, b * diag, s))
            return
        if module.magnitude_key is not None:
            magnitude = adapter.tensor(module.magnitude_key).to(device=dev, dtype=torch.float32)
            w = _dora(base.to(device=dev, dtype=torch.float32), a, b, s, magnitude, module.layout)
            out.store(w)
            return
        # Conv1D (in, out) and Embedding (num, dim) hold ΔW transposed: (B@A).T = A.T @ B.T
        low_rank.append((b, a, s) if module.layout is Layout.LINEAR else (a.T.contiguous(), b.T.contiguous(), s))
    if base.dim() == 1:  # a bias: lora_bias adds s·lora_B.bias
        w = base.to(device=dev, dtype=torch.float32)
        for module in ops.lora_biases:
            w.add_(adapter.tensor(module.lora_bias_key).to(device=dev, dtype=torch.float32), alpha=module.scaling * plan.scale)
        out.store(w)
        return
    if dev.type != "cpu":
        w = base.to(device=dev, dtype=torch.float32)
        for left, right, s in low_rank:
            w.addmm_(left, right, alpha=s)
        out.store(w)
        return
    # CPU: row blocks, so the float32 working copy stays in cache and each byte of the base is
    # read and written once. Same arithmetic: W + s·L@R in float32, rounded once into `out`.
    # The block is one reused buffer: a fresh allocation per block would be returned to the OS and
    # page-faulted in again every time, which costs more than the arithmetic.
    rows_per_block = max(1, ROW_BLOCK_BYTES // (4 * base.shape[1]))
    workspace = torch.empty((rows_per_block, base.shape[1]), dtype=torch.float32)
    for start in range(0, base.shape[0], rows_per_block):
        stop = min(start + rows_per_block, base.shape[0])
        block = workspace[: stop - start]
        block.copy_(base[start:stop])
        for left, right, s in low_rank:
            block.addmm_(left[start:stop], right, alpha=s)
        out.store(block, slice(start, stop))


def _kasa(w: torch.Tensor, a: torch.Tensor, b_diag: torch.Tensor, s: float) -> torch.Tensor:
    """PEFT's KaSA: the base loses its r smallest singular components, then ΔW = s·(B·diag(d))·A."""
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    keep = min(w.shape) - a.shape[0]
    truncated = (u[:, :keep] * sv[:keep]) @ vh[:keep]
    return truncated.addmm_(b_diag, a, alpha=s)


def _dora(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, magnitude: torch.Tensor, layout: Layout) -> torch.Tensor:
    """W' = m / ‖W + ΔW‖_row · (W + ΔW), the norm taken per output row of the (out, in) view."""
    view = w if layout is Layout.LINEAR else w.T
    view = view.addmm(b, a, alpha=s)
    view.mul_((magnitude / torch.linalg.norm(view, dim=1)).unsqueeze(1))
    return view if layout is Layout.LINEAR else view.T


def _index_json(plan: MergePlan) -> str:
    index = json.loads(json.dumps(plan.base.index))  # a deep copy; weight_map is unchanged
    total = 0
    for shard in plan.base.shards:
        for _, dtype, shape in _out_entries(plan, shard):
            n = DTYPES[dtype][0]
            for d in shape:
                n *= d
            total += n
    index.setdefault("metadata", {})["total_size"] = total
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def _record_dtype(config_path: Path, dtype_code: str) -> None:
    name = {v: k for k, v in DTYPE_CODES.items()}[dtype_code]
    config = json.loads(config_path.read_text())
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
