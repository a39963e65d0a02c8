"""The public entry points for reading and writing adapters (re-exported by `loratools`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .adapter import Adapter
from .formats.peft_dir import read_adapter, write_adapter
from .hub import ADAPTER_PATTERNS, local_model_type, resolve


def load_adapter(spec: str | os.PathLike) -> Adapter:
    """Open an adapter from a directory, a .safetensors/.bin file (config beside it) or a Hub repo
    id (`org/name[@revision]`). Reads the config and the header only; tensors load on demand."""
    adapter = read_adapter(resolve(spec, allow_patterns=ADAPTER_PATTERNS))
    adapter.source = os.fspath(spec)  # reports name what the user asked for (a repo id stays a repo id)
    if not adapter.detection.family_known:
        # Module names leave the family open (LLaMA, Qwen2, Mistral... name them alike): the base's
        # config.json, if this machine has it, says which it is.
        model_type = local_model_type(adapter.config.base_model_name_or_path)
        if model_type:
            matched = adapter.for_model_type(model_type)
            if matched.detection.family_known:
                matched.source = adapter.source
                return matched
    return adapter


def save_adapter(adapter: Adapter, out: str | os.PathLike, force: bool = False, sources: Iterable[Adapter] = ()) -> Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors), atomically;
    an existing `out` is replaced only with force=True, and never when it is, contains or sits
    inside the directory of `adapter` or of one of the `sources` it was made from."""
    return write_adapter(adapter, out, force=force, inputs=[p for s in sources for p in s.input_paths()])


def merge(
    base: str | os.PathLike,
    adapter: "str | os.PathLike | Adapter",
    out: str | os.PathLike,
    *,
    device: str = "auto",
    scale: float = 1.0,
    dtype: str | None = None,
    force: bool = False,
    progress=None,
    workers: int | None = None,
    keep_quantized: bool = False,
    initial: str | os.PathLike | Adapter | None = None,
):
    """Merge `adapter` into the checkpoint `base` and write `out`, as PEFT's merge_and_unload would.

    base: a model directory (model.safetensors or sharded with an index), a .safetensors file or a
    Hub repo id; adapter: a path, repo id or loaded Adapter. device: "auto" (CUDA when available),
    "cpu", "cuda", "cuda:N". scale multiplies every ΔW (-1 undoes a merge). dtype: "float32",
    "float16", "bfloat16" or None to keep each tensor's. progress(done_bytes, total_bytes) is called
    after each tensor. workers: shards merged at once on CPU, each in a forked process (default: one
    per core, at most one per shard). A quantized base (bitsandbytes nf4/fp4, block-scaled FP8) is
    dequantized and written in `dtype` (default bfloat16) without its quantization_config;
    keep_quantized=True (FP8 only) writes changed weights quantized again instead. initial: for a
    PiSSA/OLoRA/CorDA/LoRA-GA adapter, the adapter PEFT saved before training (it is merged as
    A′ = [A; A0], B′ = [B | −B0] into the original base).
    Returns a MergeReport. Everything is checked before the first byte is written; `out` appears
    only when complete.
    """
    from .formats.checkpoint import open_checkpoint
    from .hub import BASE_IGNORE_PATTERNS
    from .ops.merge import merge_checkpoint, plan_merge

    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter)
    if initial is not None:
        adapter = with_initial(adapter, initial)
    checkpoint = open_checkpoint(resolve(base, ignore_patterns=BASE_IGNORE_PATTERNS))
    plan = plan_merge(checkpoint, adapter, scale=scale, dtype=dtype, keep_quantized=keep_quantized)
    return merge_checkpoint(plan, out, device=device, force=force, progress=progress, workers=workers)


def with_initial(adapter: Adapter, initial: str | os.PathLike | Adapter) -> Adapter:
    """A PiSSA/OLoRA/CorDA/LoRA-GA adapter as plain LoRA on the original base (see ops/initial.py)."""
    from .ops.initial import relative_to_initial

    return relative_to_initial(adapter, initial if isinstance(initial, Adapter) else load_adapter(initial))


def extract(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int = 256,
    modules: Iterable[str] | None = None,
    embeddings: str = "lora",
    device: str = "auto",
    dtype: str | None = None,
    exact: bool = False,
    force: bool = False,
) -> dict:
    """Write to `out` a PEFT LoRA adapter approximating `finetuned` − `base` (both checkpoints:
    directories, .safetensors files or Hub ids) and return the report (the `extract --json` schema).

    Exactly one of rank (every module rank K) or energy (each module the smallest rank keeping
    this fraction of ‖ΔW‖², at most max_rank). modules: roles or leaf names to extract (default:
    every changed Linear/Conv1D). embeddings: "lora", "save" (modules_to_save) or "skip".
    """
    from .formats.atomic import check_output, refuse_overlap
    from .formats.checkpoint import open_checkpoint
    from .hub import BASE_IGNORE_PATTERNS
    from .ops.extract import extract_adapter

    base_path = resolve(base, ignore_patterns=BASE_IGNORE_PATTERNS)
    tuned_path = resolve(finetuned, ignore_patterns=BASE_IGNORE_PATTERNS)
    refuse_overlap(out, [base_path, tuned_path])  # before minutes of SVD, not after
    check_output(out, force)
    adapter, report = extract_adapter(
        open_checkpoint(base_path), open_checkpoint(tuned_path), rank=rank, energy=energy, max_rank=max_rank,
        modules=modules, embeddings=embeddings, device=device, dtype=dtype, exact=exact, base_name=os.fspath(base),
    )
    write_adapter(adapter, out, force=force, inputs=[base_path, tuned_path])
    report.out = os.fspath(out)
    return report.to_dict()


def export(
    adapter: str | os.PathLike | Adapter,
    out: str | os.PathLike,
    *,
    base_arch: str | None = None,
    base: str | os.PathLike | None = None,
    force: bool = False,
) -> dict:
    """Write `out` (.gguf): the adapter as a GGUF LoRA adapter for llama.cpp; returns the report
    (the `export --json` schema). base_arch: a key of arch.gguf.GGUF_ARCHS (default: the
    adapter's, or the base's model_type). base: a directory, config.json or Hub id whose
    config.json gives the head counts (needed to reorder q/k rows for llama.cpp) and tying."""
    from .errors import UsageError
    from .formats.json_text import parse_json
    from .ops.export_gguf import export_gguf

    if Path(out).suffix != ".gguf":
        raise UsageError(f"{out}: the output of export is a .gguf file")
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter)
    config = None
    if base is not None:
        path = resolve(base, allow_patterns=["config.json"])
        path = path / "config.json" if path.is_dir() else path
        try:
            config = parse_json(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--base {base}: no readable config.json ({exc})") from None
        if not isinstance(config, dict):
            raise UsageError(f"--base {base}: config.json is not a JSON object")
        if isinstance(config.get("model_type"), str):
            adapter = adapter.for_model_type(config["model_type"])
            base_arch = base_arch or config["model_type"]
    return export_gguf(adapter, out, base_arch=base_arch, base_config=config, force=force).to_dict()
