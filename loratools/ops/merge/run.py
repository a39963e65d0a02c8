"""Merge an adapter into base weights, streaming, with the semantics of PEFT's merge_and_unload.

Two phases. `plan_merge` (plan.py) reads headers only: it maps every adapter module and
extra tensor onto a base tensor, checks shapes and dtypes, and fails before anything is written.
`merge_checkpoint` then writes the output: every shard is streamed tensor by tensor
(shard.py: untouched tensors copied byte for byte, touched ones changed in float32 and
rounded once into the output dtype), shards in parallel worker processes on CPU
(workers.py), and the whole output appears at once when complete (formats/atomic.py).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...errors import UsageError
from ...formats.atomic import atomic_dir, atomic_file, copy_regular, create, refuse_overlap, write_bytes
from ...formats.checkpoint import INDEX_NAME
from ...formats.dtypes import DTYPES
from ...formats.safetensors_writer import tensor_nbytes
from ...report import Report
from ..device import resolve_device_name
from . import shard as merge_shard
from .plan import MergePlan
from .workers import available_cpus, run_jobs

@dataclass
class MergeReport(Report):
    base: str
    adapter: str
    out: str
    device: str
    shards: int
    workers: int  # shards merged at once (processes on CPU)
    tensors: int
    tensors_changed: int  # by a LoRA ΔW, DoRA or lora_bias
    tensors_replaced: int  # by modules_to_save, trained biases, saved embeddings
    base_quantization: str | None  # e.g. "nf4, double quant, blocksize 64": dequantized (or kept: keep_quantized)
    keep_quantized: bool
    bytes_written: int
    seconds: float
    skipped_files: list[str]

    def render(self) -> str:
        lines = [f"merged into {self.out}: {self.tensors_changed} tensors changed, {self.tensors_replaced} replaced, "
                 f"{self.tensors} in {self.shards} shard(s); {self.bytes_written:,} bytes in {self.seconds:.2f} s on {self.device}"]
        if self.base_quantization:
            how = "changed weights re-quantized" if self.keep_quantized else "dequantized"
            lines.append(f"quantized base ({self.base_quantization}): {how}")
        return "\n".join(lines)

    def notices(self) -> list[str]:
        return [f"not copied (weights in other formats): {', '.join(self.skipped_files)}"] if self.skipped_files else []


def merge_checkpoint(
    plan: MergePlan,
    out: str | os.PathLike,
    device: str = "auto",
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> MergeReport:
    """Execute a plan: write OUT (a directory mirroring BASE, or a single file) atomically.
    workers: shards merged at once on CPU, each in its own process (default: one per core)."""
    started = time.perf_counter()
    dev = resolve_device_name(device)
    plan = plan.on_device(dev)  # the kernel of every computed tensor depends on it
    workers = _worker_count(workers, dev, len(plan.base.shards))
    base = plan.base
    out = Path(out)
    refuse_overlap(out, [base.path, *plan.adapter.input_paths()])
    if progress:
        total = sum(h.file_size - h.data_start for h in base.shards.values())
        progress = _ProgressAdapter(progress, total)
    # Output files get the permissions of the files they mirror (mkstemp/mkdtemp would give 0600/0700).
    if base.is_file:
        with atomic_file(out, force=force, mode=_mode(base.path)) as tmp:
            written = _write_shards(plan, [(base.path, next(iter(base.shards)), tmp)], dev, workers, progress)
            _require_unchanged(plan)
    else:
        with atomic_dir(out, force=force, mode=_mode(base.path)) as tmp:
            jobs = []
            for shard in base.shards:
                (tmp / shard).parent.mkdir(parents=True, exist_ok=True)
                # Created here, through the checked create, before a worker reopens it to write:
                # a directory where no file can be made fails once, in this process, as one line.
                os.close(create(tmp / shard))
                jobs.append((base.path / shard, shard, tmp / shard))
            written = _write_shards(plan, jobs, dev, workers, progress)
            for shard in base.shards:
                os.chmod(tmp / shard, _mode(base.path / shard))
            if base.index is not None:
                write_bytes(tmp / INDEX_NAME, _index_json(plan).encode("utf-8"))
                os.chmod(tmp / INDEX_NAME, _mode(base.path / INDEX_NAME))
            for rel in base.other_files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                copy_regular(base.path / rel, tmp / rel)  # follows Hub cache symlinks; a FIFO or device: not-a-file
                os.chmod(tmp / rel, _mode(base.path / rel))
            if (plan.out_dtype or plan.keep_quantized or plan.untied or plan.vocab_resized) and (tmp / "config.json").is_file():
                _record_config(tmp / "config.json", plan)
            _require_unchanged(plan)
    changed = sum(1 for o in plan.ops.values() if o.modules or o.lora_biases)
    replaced = sum(1 for o in plan.ops.values() if o.replace_key and not (o.modules or o.lora_biases))
    return MergeReport(
        base=str(base.path),
        adapter=str(plan.adapter.source),
        out=str(out),
        device=dev,
        shards=len(base.shards),
        workers=workers,
        tensors=sum(len(outputs) for outputs in plan.outputs.values()),
        tensors_changed=changed,
        tensors_replaced=replaced,
        base_quantization=base.describe_quantization(),
        keep_quantized=plan.keep_quantized,
        bytes_written=written,
        seconds=round(time.perf_counter() - started, 3),
        skipped_files=list(base.skipped_files),
    )


def _worker_count(workers: int | None, dev: str, shards: int) -> int:
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise UsageError(f"--workers must be a positive integer, got {workers!r}")
    if dev != "cpu":
        # CUDA cannot be used in a forked process, and one device gains nothing from several feeders.
        if workers not in (None, 1):
            raise UsageError(f"--workers {workers}: a {dev} merge runs in one process (its pipeline keeps the device busy); use --device cpu for workers")
        return 1
    return min(workers or available_cpus(), shards)


def _write_shards(plan: MergePlan, jobs: list[tuple[Path, str, Path]], dev: str, workers: int, progress) -> int:
    """Every shard written; on CPU in worker processes (forked: they inherit the plan), on a
    device in this process, one shard after the other."""
    if dev != "cpu":
        return sum(merge_shard.write_shard(plan, src, shard, dst, progress) for src, shard, dst in jobs)
    if merge_shard.needs_torch(plan):
        import torch  # once, here: forked workers inherit it instead of each importing it

        threads = max(1, available_cpus() // workers)
    else:
        torch = None

    def work(job, report) -> int:
        from threadpoolctl import threadpool_limits

        if torch is not None:
            torch.set_num_threads(threads)  # the cores are shared between the workers
        # numpy's BLAS would start a thread per core in every worker, spinning against each
        # other on the small products of a merge (measured: 10x slower); one thread each.
        with threadpool_limits(limits=1, user_api="blas"):
            return merge_shard.write_shard(plan, *job, report)

    return sum(run_jobs(jobs, work, workers, describe=lambda job: f"base shard {job[1]}", progress=progress))


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


def _index_json(plan: MergePlan) -> str:
    """The base's index with OUT's weight map: exactly the planned output tensors (a dequantized
    base loses its scales and code maps; an untied head is written beside its embedding)."""
    index = json.loads(json.dumps(plan.base.index))  # a deep copy: other fields are kept
    index["weight_map"] = {out.name: shard for shard, outputs in plan.outputs.items() for out in outputs}
    total = sum(tensor_nbytes(out.dtype, out.shape) for outputs in plan.outputs.values() for out in outputs)
    index.setdefault("metadata", {})["total_size"] = total
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def _record_config(config_path: Path, plan: MergePlan) -> None:
    """config.json of OUT: the dtype it now has; a dequantized base loses its quantization_config
    (transformers would otherwise expect packed weights); an untied head unties the embeddings,
    in a nested text_config too (transformers 5 takes a tie from there, or from its default)."""
    config = json.loads(config_path.read_text())
    if plan.untied:
        for part in (config, config.get("text_config")):
            if isinstance(part, dict):
                part["tie_word_embeddings"] = False
    if plan.vocab_resized:
        _record_vocab_size(config, plan.vocab_resized[1])
    if plan.out_dtype:
        name = DTYPES[plan.out_dtype].name
        keys = [key for key in ("torch_dtype", "dtype") if key in config] or ["dtype"]
        config.update({key: name for key in keys})
    if plan.base.quantized and not plan.keep_quantized:
        config.pop("quantization_config", None)
    write_bytes(config_path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _record_vocab_size(config: dict, size: int) -> None:
    """A resized vocabulary (vocab.py): vocab_size where the config records it (a nested
    text_config too), else at the top level."""
    parts = [part for part in (config, config.get("text_config")) if isinstance(part, dict) and "vocab_size" in part]
    for part in parts or [config]:
        part["vocab_size"] = size
