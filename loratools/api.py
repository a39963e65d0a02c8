"""The library: one function per command, each returning that command's report (a
`loratools.report.Report`: `report.to_dict()` is the command's `--json` document, `report.render()`
its text), and the adapter reader and writer. Re-exported by `loratools`.

Adapters are given as a path, a Hub repo id (`org/name[@revision]`) or a loaded Adapter; base
checkpoints as a directory (sharded or not), a .safetensors file, a Hub repo id or an opened
Checkpoint (formats/checkpoint.py). Only the functions that need tensors import torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from .adapter import Adapter
from .errors import UsageError
from .adapter_dir.peft_dir import read_adapter, write_adapter
from .hub import ADAPTER_PATTERNS, BASE_IGNORE_PATTERNS, local_model_type, resolve
from .ops.svd import DEFAULT_THRESHOLDS

if TYPE_CHECKING:
    from typing import Union

    from .formats.checkpoint import Checkpoint
    from .ops.combine import CombineReport
    from .ops.convert import ConvertReport
    from .ops.export_gguf import ExportReport
    from .ops.extract import ExtractReport
    from .ops.info import InfoReport
    from .ops.merge import MergeReport, PlanReport
    from .ops.resize import ResizeReport
    from .ops.svd import SvdReport
    from .ops.to_lora import ToLoraReport
    from .ops.validate import ValidateReport

    AdapterSpec = Union[str, os.PathLike, Adapter]  # a path, a Hub repo id or a loaded adapter
    BaseSpec = Union[str, os.PathLike, Checkpoint]  # a path, a Hub repo id or an opened checkpoint


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


def _adapter(spec: AdapterSpec) -> Adapter:
    return spec if isinstance(spec, Adapter) else load_adapter(spec)


def _open_base(spec: BaseSpec) -> Checkpoint:
    """A base checkpoint, headers only (a Hub repo: its safetensors and small files are fetched)."""
    from .formats.checkpoint import Checkpoint, open_checkpoint

    return spec if isinstance(spec, Checkpoint) else open_checkpoint(resolve(spec, ignore_patterns=BASE_IGNORE_PATTERNS))


def info(adapter: AdapterSpec, base: BaseSpec | None = None, compare_base: BaseSpec | None = None) -> InfoReport:
    """Describe the adapter from its config and header (no tensor is loaded). base: also describe
    this checkpoint (report.base: tensors, shards, quantization); compare_base: with a quantized
    base, its 16-bit original: report.base["compare"] gives ‖W16 − dq(W)‖ / ‖ΔW‖ per module."""
    from .ops.info import adapter_info

    if compare_base is not None and base is None:
        raise UsageError("--compare-base needs --base (the quantized base it is compared with)")
    loaded = _adapter(adapter)
    report = adapter_info(loaded)
    if base is not None:
        from .ops.base_report import base_summary, compare_bases

        checkpoint = _open_base(base)
        report.base = base_summary(checkpoint)
        from .ops.merge.vocab import vocabulary_change

        change = vocabulary_change(checkpoint, loaded)  # an adapter trained with added tokens
        if change is not None:
            report.base["vocabulary"] = change
        if compare_base is not None:
            report.base["compare"] = compare_bases(loaded, checkpoint, _open_base(compare_base))
    return report


def validate(
    adapters: Iterable[str | os.PathLike] | str | os.PathLike,
    base: BaseSpec | None = None,
    target: str | None = None,
    strict: bool = False,
) -> ValidateReport:
    """Check adapter files (directories, or files in them: each directory once) without loading a
    model; every problem is a finding with a stable code. base: also check against this checkpoint;
    target: "vllm" (the newest release known), "vllm@VERSION", "sglang" or "llama.cpp", also what
    that runtime refuses or serves differently, and what serving the adapters together needs. report.ok (and exit_code) is the
    verdict: no errors, and with strict=True no warnings either."""
    from .ops.validate import ValidateReport, validate_many
    from .runtimes import resolve as resolve_target

    if target is not None:
        resolve_target(target)  # a UsageError naming the accepted forms, before any adapter is read
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    checkpoint = _open_base(base) if base is not None else None
    return ValidateReport(validate_many(adapters, checkpoint, target), strict, checkpoint)


def merge(
    base: BaseSpec,
    adapter: AdapterSpec,
    out: str | os.PathLike,
    *,
    device: str = "auto",
    scale: float = 1.0,
    dtype: str | None = None,
    force: bool = False,
    progress=None,
    workers: int | None = None,
    keep_quantized: bool = False,
    initial: AdapterSpec | None = None,
    dry_run: bool = False,
) -> MergeReport | PlanReport:
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
    dry_run: plan only and return the plan (a PlanReport: every output tensor, what makes it, with
    which kernel, from which adapter tensors); nothing is written.
    Returns a MergeReport. Everything is checked before the first byte is written; `out` appears
    only when complete.
    """
    from .ops.merge import PlanReport, merge_checkpoint, plan_merge, resolve_device_name

    adapter = _adapter(adapter)
    if initial is not None:
        adapter = with_initial(adapter, initial)
    plan = plan_merge(_open_base(base), adapter, scale=scale, dtype=dtype, keep_quantized=keep_quantized)
    if dry_run:
        return PlanReport(plan.on_device(resolve_device_name(device)), os.fspath(out))
    return merge_checkpoint(plan, out, device=device, force=force, progress=progress, workers=workers)


def with_initial(adapter: Adapter, initial: AdapterSpec) -> Adapter:
    """A PiSSA/OLoRA/CorDA/LoRA-GA adapter as plain LoRA on the original base (see ops/initial.py)."""
    from .ops.initial import relative_to_initial

    return relative_to_initial(adapter, _adapter(initial))


def svd(adapter: AdapterSpec, thresholds: Iterable[float] = DEFAULT_THRESHOLDS, plot: str | os.PathLike | None = None,
        force: bool = False) -> SvdReport:
    """Every module's singular values of ΔW = s·B·A (from the factors; ΔW is never formed), its
    effective, stable and energy ranks (at each threshold), summaries per role and layer.
    plot: also draw the normalised spectra per role to this PNG (needs matplotlib; force replaces it)."""
    from .ops.svd import plot_spectra, svd_report

    report = svd_report(_adapter(adapter), thresholds)
    if plot is not None:
        plot_spectra(report, plot, force=force)
    return report


def resize(adapter: AdapterSpec, out: str | os.PathLike, *, rank: int | None = None, energy: float | None = None,
           force: bool = False) -> ResizeReport:
    """Write to `out` the adapter with each module's ΔW replaced by its best rank-K approximation
    (rank), or by the smallest rank keeping the fraction `energy` of its Σσ²."""
    from .ops.resize import resize_adapter, resize_report

    source = _adapter(adapter)
    resized, modules = resize_adapter(source, rank=rank, energy=energy)
    save_adapter(resized, out, force=force, sources=[source])
    return resize_report(source, os.fspath(out), modules)


def convert(
    adapter: AdapterSpec,
    out: str | os.PathLike,
    *,
    to: str | None = None,
    source: str | None = None,
    head: str | None = None,
    drop_unmapped: bool = False,
    base_model: str | None = None,
    to_lora: bool = False,
    base: BaseSpec | None = None,
    initial: AdapterSpec | None = None,
    rank: int | None = None,
    energy: float | None = None,
    force: bool = False,
) -> ConvertReport | ToLoraReport:
    """Write to `out` the adapter renamed for another module naming scheme, every role's ΔW
    unchanged: to (default the first of arch.CONVERT_SCHEMES, llama), source (default: detected),
    head (the target's head family), drop_unmapped (drop modules with no counterpart instead of
    failing), base_model (the new base_model_name_or_path). Returns a ConvertReport.

    to_lora=True instead writes the same modules with scaling 1 everywhere (ToLoraReport): base
    and rank or energy for a DoRA adapter (its best rank-K LoRA on that base), initial for a
    PiSSA/OLoRA/CorDA/LoRA-GA adapter (the adapter PEFT saved before training)."""
    if to_lora:
        renaming = {"--from": source, "--to": to, "--prefix": head, "--drop-unmapped": drop_unmapped, "--base-model": base_model}
        given = [flag for flag, value in renaming.items() if value not in (None, False)]
        if given:
            raise UsageError(f"--to-lora keeps the module names; it does not combine with {', '.join(given)}")
    elif base is not None or initial is not None or rank is not None or energy is not None:
        raise UsageError("--base, --initial, --rank and --energy go with --to-lora")
    loaded = _adapter(adapter)
    if to_lora:
        from .ops.to_lora import to_plain_lora

        if initial is not None:
            loaded = with_initial(loaded, initial)
        written, report = to_plain_lora(loaded, _open_base(base) if base is not None else None, rank=rank, energy=energy)
    else:
        from .arch import CONVERT_SCHEMES
        from .ops.convert import convert_adapter

        written, report = convert_adapter(loaded, to=to or CONVERT_SCHEMES[0], source=source, head=head,
                                          drop_unmapped=drop_unmapped, base_model=base_model)
    save_adapter(written, out, force=force, sources=[loaded])
    report.out = os.fspath(out)
    return report


def combine(
    adapters: Iterable[AdapterSpec],
    out: str | os.PathLike,
    *,
    method: str = "cat",
    weights: Iterable[float] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int = 0,
    force: bool = False,
) -> CombineReport:
    """Write to `out` one adapter from several for the same base architecture. method: one of
    ops.choices.COMBINE_METHODS — cat (exactly Σ wᵢ·ΔWᵢ), svd (its best rank-K approximation: rank
    or energy), or PEFT's add_weighted_adapter types (linear, ties, dare_linear, dare_ties,
    magnitude_prune; density, majority_sign, seed). weights: one per adapter, default 1 each."""
    from .ops.combine import combine_adapters

    loaded = [_adapter(a) for a in adapters]
    combined, report = combine_adapters(loaded, method=method, weights=weights, rank=rank, energy=energy, density=density,
                                        majority_sign=majority_sign, seed=seed)
    save_adapter(combined, out, force=force, sources=loaded)
    report.out = os.fspath(out)
    return report


def extract(
    base: BaseSpec,
    finetuned: BaseSpec,
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
) -> ExtractReport:
    """Write to `out` a PEFT LoRA adapter approximating `finetuned` − `base` (both checkpoints)
    and return its report: per module the rank, the energy kept and the relative error, and every
    changed tensor the adapter cannot carry.

    Exactly one of rank (every module rank K) or energy (each module the smallest rank keeping
    this fraction of ‖ΔW‖², at most max_rank). modules: roles or leaf names to extract (default:
    every changed Linear/Conv1D). embeddings: "lora", "save" (modules_to_save) or "skip".
    """
    from .formats.atomic import check_output, refuse_overlap
    from .ops.extract import extract_adapter

    base_checkpoint, tuned_checkpoint = _open_base(base), _open_base(finetuned)
    inputs = [base_checkpoint.path, tuned_checkpoint.path]
    refuse_overlap(out, inputs)  # before minutes of SVD, not after
    check_output(out, force)
    adapter, report = extract_adapter(
        base_checkpoint, tuned_checkpoint, rank=rank, energy=energy, max_rank=max_rank, modules=modules,
        embeddings=embeddings, device=device, dtype=dtype, exact=exact,
        base_name=None if base is base_checkpoint else os.fspath(base),  # as given: a repo id stays a repo id
    )
    write_adapter(adapter, out, force=force, inputs=inputs)
    report.out = os.fspath(out)
    return report


def export(
    adapter: AdapterSpec,
    out: str | os.PathLike,
    *,
    base_arch: str | None = None,
    base: str | os.PathLike | None = None,
    force: bool = False,
) -> ExportReport:
    """Write `out` (.gguf): the adapter as a GGUF LoRA adapter for llama.cpp, every module's own
    scaling folded into its B. base_arch: a key of arch.gguf.GGUF_ARCHS (default: the
    adapter's, or the base's model_type). base: a directory, config.json or Hub id whose
    config.json gives the head counts (needed to reorder q/k rows for llama.cpp) and tying."""
    from .errors import ConfigError
    from .formats.json_text import read_json_file
    from .ops.export_gguf import export_gguf

    if Path(out).suffix != ".gguf":
        raise UsageError(f"{out}: the output of export is a .gguf file")
    adapter = _adapter(adapter)
    config = None
    if base is not None:
        path = resolve(base, allow_patterns=["config.json"])
        path = path / "config.json" if path.is_dir() else path
        config = read_json_file(path, error=ConfigError)  # a regular file of bounded size: not-a-file, too-large...
        if not isinstance(config, dict):
            raise UsageError(f"--base {base}: config.json is not a JSON object")
        if isinstance(config.get("model_type"), str):
            adapter = adapter.for_model_type(config["model_type"])
            base_arch = base_arch or config["model_type"]
    return export_gguf(adapter, out, base_arch=base_arch, base_config=config, force=force)
