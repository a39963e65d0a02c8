"""The `loratools` command: parse options, call one library function, print the result.

Every LoraToolsError becomes `Error: <one line>` on stderr and a non-zero exit; usage errors
exit 2 (click's convention). `--debug` re-raises so the traceback shows. torch is never imported
here: the library imports it inside the functions that need tensors.
"""

from __future__ import annotations

import json
import signal
import sys

import click

from .errors import LoraToolsError


class _Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP, raised like Ctrl-C so that every partial output is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise _Terminated(signum)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        debug = "--debug" in sys.argv[1:] or (ctx.params or {}).get("debug", False)
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                signal.signal(sig, _on_signal)
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except LoraToolsError as exc:
            if debug:
                raise
            _fail(str(exc), exc.exit_code)
        except _Terminated as exc:
            _fail(f"terminated by {signal.Signals(exc.signum).name}; nothing was written", 128 + exc.signum)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)
        except Exception as exc:  # a bug in loratools, or an error we failed to anticipate
            if debug:
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            _fail(f"unexpected {type(exc).__name__}: {first} (rerun with --debug for the traceback)", 1)


def _fail(message: str, code: int) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
@click.version_option(package_name="loratools")
def main(debug: bool) -> None:
    """Work with LoRA adapters (PEFT format) as files: inspect, validate, convert, combine, merge.

    ADAPTER arguments accept an adapter directory, its .safetensors (or legacy .bin) file, or a
    Hugging Face Hub repo id (org/name or org/name@revision); an existing local path always wins.
    """


@main.command()
@click.argument("adapter")
@click.option("--base", help="Also describe this base checkpoint (quantization, from headers).")
@click.option("--compare-base", help="With a quantized --base: its 16-bit original; report ‖W16−dq(W)‖/‖ΔW‖ per module.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (schema in the README).")
def info(adapter: str, base: str | None, compare_base: str | None, as_json: bool) -> None:
    """Describe an adapter: architecture, ranks, scaling, targets, parameters, extra tensors.

    Reads only the config and the safetensors header; no tensor is loaded (--compare-base
    reads the base weights the adapter changes, one at a time).
    """
    from .api import load_adapter
    from .ops.info import adapter_info, render_info

    if compare_base and not base:
        raise click.UsageError("--compare-base needs --base (the quantized base it is compared with)")
    loaded = load_adapter(adapter)
    report = adapter_info(loaded)
    text = [render_info(report)]
    if base:
        from .formats.checkpoint import open_checkpoint
        from .hub import BASE_IGNORE_PATTERNS, resolve
        from .ops.base_report import base_summary, compare_bases, render_base, render_compare

        checkpoint = open_checkpoint(resolve(base, ignore_patterns=BASE_IGNORE_PATTERNS))
        report["base"] = base_summary(checkpoint)
        text.append(render_base(report["base"]))
        if compare_base:
            reference = open_checkpoint(resolve(compare_base, ignore_patterns=BASE_IGNORE_PATTERNS))
            report["base"]["compare"] = compare_bases(loaded, checkpoint, reference)
            text.append(render_compare(report["base"]["compare"]))
    _print_json(report) if as_json else click.echo("\n".join(text))


@main.command()
@click.argument("base")
@click.argument("adapter")
@click.argument("out", type=click.Path())
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda or cuda:N.")
@click.option("--scale", default=1.0, show_default=True, type=float, help="Multiply every ΔW (-1 undoes an earlier merge).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Output dtype of float tensors [default: keep each; bfloat16 for a quantized base].")
@click.option("--keep-quantized", is_flag=True, help="FP8 base: write changed weights re-quantized (new block scales), not dequantized.")
@click.option("--initial", help="PiSSA/OLoRA/CorDA/LoRA-GA adapter: the initial adapter PEFT saved before training.")
@click.option("--workers", type=int, help="Shards merged at once on CPU, one process each [default: one per core].")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (schema in the README).")
def merge(base, adapter, out, device, scale, dtype, keep_quantized, initial, workers, force, quiet, as_json) -> None:
    """Merge ADAPTER into the BASE checkpoint and write OUT, like PEFT's merge_and_unload.

    BASE is a model directory (model.safetensors, or shards with model.safetensors.index.json),
    a single .safetensors file or a Hub repo id; OUT mirrors it (same shards, index, config and
    tokenizer files). Streams tensor by tensor; nothing appears at OUT unless the merge completes.
    A quantized BASE (bitsandbytes nf4/fp4, block-scaled FP8) is dequantized: OUT is a bfloat16
    model (see --dtype) without quantization_config.
    """
    from .api import merge as run_merge

    with _progress_bar(enabled=not quiet and not as_json, label="merging") as progress:
        report = run_merge(base, adapter, out, device=device, scale=scale, dtype=dtype, force=force, progress=progress,
                           workers=workers, keep_quantized=keep_quantized, initial=initial)
    if as_json:
        _print_json(report.to_dict())
    elif not quiet:
        click.echo(
            f"merged into {report.out}: {report.tensors_changed} tensors changed, {report.tensors_replaced} replaced, "
            f"{report.tensors} in {report.shards} shard(s); {report.bytes_written:,} bytes in {report.seconds:.2f} s on {report.device}"
        )
        if report.base_quantization:
            how = "changed weights re-quantized" if report.keep_quantized else "dequantized"
            click.echo(f"quantized base ({report.base_quantization}): {how}")
        if report.skipped_files:
            click.echo(f"not copied (weights in other formats): {', '.join(report.skipped_files)}", err=True)


@main.command()
@click.argument("base")
@click.argument("finetuned")
@click.argument("out", type=click.Path())
@click.option("--rank", type=int, help="Rank K for every module.")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction of ‖ΔW‖² (0-1].")
@click.option("--max-rank", default=256, show_default=True, help="With --energy: the largest rank a module may get.")
@click.option("--modules", help="Comma-separated roles (attn_q, ffn_down...) or leaf names (q_proj...) [default: every changed Linear].")
@click.option("--embeddings", type=click.Choice(["lora", "save", "skip"]), default="lora", show_default=True,
              help="A changed token embedding: LoRA, stored whole (modules_to_save) or left out (reported).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Factor dtype [default: the weights' own].")
@click.option("--exact", is_flag=True, help="Full SVD of every module instead of the randomized one (slower, same result up to round-off).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report (schema in the README).")
def extract(base, finetuned, out, rank, energy, max_rank, modules, embeddings, device, dtype, exact, force, as_json) -> None:
    """Write a LoRA adapter OUT approximating FINETUNED − BASE (the inverse of merge).

    Streams both checkpoints tensor by tensor; each changed Linear/Conv1D weight gets its best
    rank-K (or energy-T) approximation, balanced factors, scaling 1. Reports the energy kept and
    the relative error per module, and every changed tensor the adapter cannot carry.
    """
    from .api import extract as run_extract
    from .ops.extract import render_extract

    chosen = [m.strip() for m in modules.split(",") if m.strip()] if modules else None
    report = run_extract(base, finetuned, out, rank=rank, energy=energy, max_rank=max_rank, modules=chosen,
                         embeddings=embeddings, device=device, dtype=dtype, exact=exact, force=force)
    _print_json(report) if as_json else click.echo(render_extract(report))


@main.command()
@click.argument("adapter")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (schema in the README).")
@click.option("--threshold", "thresholds", type=float, multiple=True, metavar="T",
              help="Energy level for the energy rank (repeatable) [default: 0.9 and 0.99].")
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw normalised spectra per role to this PNG (needs matplotlib).")
@click.option("--force", is_flag=True, help="Replace the --plot file if it exists.")
def svd(adapter, as_json, thresholds, plot, force) -> None:
    """Effective rank of every module's ΔW = s·B·A, per module, role and layer.

    Singular values come from QR of the factors and an r×r SVD: exact, and ΔW is never formed.
    """
    from .api import load_adapter
    from .ops.svd import DEFAULT_THRESHOLDS, plot_spectra, render_svd, svd_report

    for t in thresholds:
        if not 0 < t <= 1:
            raise click.BadParameter(f"{t} is not in (0, 1]", param_hint="--threshold")
    report = svd_report(load_adapter(adapter), thresholds or DEFAULT_THRESHOLDS)
    if plot:
        plot_spectra(report, plot, force=force)
    _print_json(report) if as_json else click.echo(render_svd(report))


@main.command()
@click.argument("adapter")
@click.argument("out", type=click.Path())
@click.option("--rank", type=int, help="Target rank K for every module.")
@click.option("--energy", type=float, help="Smallest rank keeping this fraction T of each module's energy (Σσ²).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (schema in the README).")
def resize(adapter, out, rank, energy, force, as_json) -> None:
    """Shrink ADAPTER: each module becomes the best rank-K (or energy-T) approximation of its ΔW.

    Written as a PEFT adapter; modules already at or below K are kept exactly.
    """
    from .api import load_adapter, save_adapter
    from .ops.resize import resize_adapter, resize_report

    source = load_adapter(adapter)
    resized, modules = resize_adapter(source, rank=rank, energy=energy)
    save_adapter(resized, out, force=force, sources=[source])
    report = resize_report(source, out, modules)
    if as_json:
        _print_json(report)
    else:
        s = report["summary"]
        click.echo(
            f"resized into {out}: {s['truncated']} of {s['modules']} modules truncated, LoRA parameters "
            f"{s['lora_parameters_before']:,} -> {s['lora_parameters_after']:,}, lowest retained energy {s['min_retained_energy']:.4f}"
        )


@main.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("--base", help="Also check against this base checkpoint (headers only).")
@click.option("--target", type=click.Choice(["vllm", "llama.cpp"]), help="Also check what this serving runtime refuses or serves differently.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (schema in the README).")
@click.option("--strict", is_flag=True, help="Warnings fail too.")
def validate(adapters, base, target, as_json, strict) -> None:
    """Check adapter files without loading a model. Exit 0: valid; 1: problems; 2: usage error.

    ADAPTERS are adapter directories or files in them (each directory is checked once), so
    pre-commit can pass changed files. Every problem is reported, each with a stable code.
    """
    from .formats.checkpoint import open_checkpoint
    from .hub import BASE_IGNORE_PATTERNS, resolve
    from .ops.validate import render, report, validate_many

    checkpoint = open_checkpoint(resolve(base, ignore_patterns=BASE_IGNORE_PATTERNS)) if base else None
    results = validate_many(adapters, checkpoint, target)
    _print_json(report(results, strict, checkpoint)) if as_json else click.echo(render(results, strict, checkpoint))
    sys.exit(0 if all(r.ok(strict) for r in results) else 1)


def _convert_schemes() -> list[str]:
    from .arch import CONVERT_SCHEMES

    return list(CONVERT_SCHEMES)


ARCH_CHOICES = click.Choice(_convert_schemes())
DEFAULT_TARGET = _convert_schemes()[0]


@main.command()
@click.argument("adapter")
@click.argument("out", type=click.Path())
@click.option("--from", "source", type=ARCH_CHOICES, help="Source naming scheme [default: detected].")
@click.option("--to", "target", type=ARCH_CHOICES, default=DEFAULT_TARGET, show_default=True, help="Target naming scheme.")
@click.option("--prefix", "head", help="Target head class family, e.g. causal-lm, base, sequence-classification [default: the target's first].")
@click.option("--drop-unmapped", is_flag=True, help="Drop modules with no counterpart instead of failing.")
@click.option("--base-model", help="base_model_name_or_path for the new config [default: cleared].")
@click.option("--to-lora", is_flag=True, help="Instead: the same adapter with scaling 1 in every module (what vLLM and llama.cpp read alike).")
@click.option("--base", help="--to-lora of a DoRA adapter: the base checkpoint its ΔW depends on.")
@click.option("--initial", help="--to-lora of a PiSSA/OLoRA/CorDA/LoRA-GA adapter: the initial adapter PEFT saved before training.")
@click.option("--rank", type=int, help="--to-lora of a DoRA adapter: rank K of each module's LoRA.")
@click.option("--energy", type=float, help="--to-lora of a DoRA adapter: per module, the smallest rank keeping this fraction of ‖ΔW‖².")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (schema in the README).")
@click.pass_context
def convert(ctx, adapter, out, source, target, head, drop_unmapped, base_model, to_lora, base, initial, rank, energy, force,
            as_json) -> None:
    """Rewrite ADAPTER for another module naming scheme; every role's ΔW stays exactly the same.

    GPT-2's fused c_attn is split into q/k/v (rows of B) or joined from them (A stacked, B
    block-diagonal: the ranks add up). Modules with no counterpart are an error unless
    --drop-unmapped.

    With --to-lora, the names stay and every module's scaling (rank/alpha patterns, rsLoRA)
    is folded into its B: a plain LoRA with scaling 1 that serving runtimes read as PEFT does.
    A DoRA module becomes the best rank-K LoRA of its ΔW on --base (--rank K or --energy T); a
    PiSSA/OLoRA/CorDA/LoRA-GA adapter, LoRA on the original base with --initial DIR.
    """
    from .api import load_adapter, save_adapter
    from .ops.convert import convert_adapter

    source_adapter = load_adapter(adapter)
    if not to_lora and (base or initial or rank is not None or energy is not None):
        raise click.UsageError("--base, --initial, --rank and --energy go with --to-lora")
    if to_lora:
        renaming = {"source": "--from", "target": "--to", "head": "--prefix", "drop_unmapped": "--drop-unmapped",
                    "base_model": "--base-model"}
        given = [flag for param, flag in renaming.items() if ctx.get_parameter_source(param) is click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--to-lora keeps the module names; it does not combine with {', '.join(given)}")
        sources = [source_adapter]
        if initial:
            from .ops.initial import relative_to_initial

            sources.append(load_adapter(initial))
            source_adapter = relative_to_initial(source_adapter, sources[-1])
        _convert_to_lora(source_adapter, sources, adapter, out, base, rank, energy, force, as_json)
        return
    converted, report = convert_adapter(
        source_adapter, to=target, source=source, head=head, drop_unmapped=drop_unmapped, base_model=base_model
    )
    save_adapter(converted, out, force=force, sources=[source_adapter])
    if as_json:
        _print_json({"adapter": adapter, "out": out, **report.__dict__})
    else:
        click.echo(
            f"converted {report.source_architecture} -> {report.target_architecture} ({report.head}) into {out}: "
            f"{len(report.modules)} modules"
        )
        if report.dropped:
            click.echo(f"dropped (no counterpart): {', '.join(report.dropped)}")


def _convert_to_lora(source_adapter, sources, adapter, out, base, rank, energy, force, as_json) -> None:
    from .api import save_adapter
    from .ops.to_lora import to_plain_lora

    checkpoint = None
    if base:
        from .formats.checkpoint import open_checkpoint
        from .hub import BASE_IGNORE_PATTERNS, resolve

        checkpoint = open_checkpoint(resolve(base, ignore_patterns=BASE_IGNORE_PATTERNS))
    plain, report = to_plain_lora(source_adapter, checkpoint, rank=rank, energy=energy)
    save_adapter(plain, out, force=force, sources=sources)
    if as_json:
        _print_json({"adapter": adapter, "out": out, "modules": report.modules, "rescaled": report.rescaled,
                     "dora": [m.__dict__ for m in report.dora]})
        return
    click.echo(f"converted to plain LoRA (scaling 1 in every module) into {out}: {report.modules} modules, "
               f"{len(report.rescaled)} with their scaling folded into B")
    if report.dora:
        worst = max(report.dora, key=lambda m: m.relative_error)
        click.echo(f"{len(report.dora)} DoRA modules as rank-{'/'.join(sorted({str(m.rank) for m in report.dora}))} LoRA; "
                   f"largest relative error ‖ΔW−ΔW_K‖/‖ΔW‖ {worst.relative_error:.3g} ({worst.name})")
        for m in report.dora:
            click.echo(f"  {m.name:<48} rank {m.rank:<5} energy kept {m.retained_energy:.6f}  error {m.relative_error:.3g}")


def _parse_weights(ctx, param, value):
    if value is None:
        return None
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


@main.command()
@click.argument("adapter")
@click.argument("out", type=click.Path())
@click.option("--base-arch", help="llama.cpp architecture: llama, mistral or qwen2 [default: the adapter's or the base's].")
@click.option("--base", help="Base model directory, config.json or Hub repo: only config.json is read (head counts, tied embeddings).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (schema in the README).")
def export(adapter, out, base_arch, base, force, as_json) -> None:
    """Write ADAPTER as a GGUF LoRA adapter (OUT.gguf) that llama.cpp loads with --lora.

    Every module's own scaling (rank/alpha patterns, rsLoRA) is folded into its B, since
    llama.cpp has one alpha per file; q/k rows follow llama.cpp's rotary order for LLaMA.
    """
    from .api import export as run_export

    report = run_export(adapter, out, base_arch=base_arch, base=base, force=force)
    if as_json:
        _print_json(report)
    else:
        click.echo(f"exported {report['modules']} modules ({report['tensors']} tensors) to {report['out']}: "
                   f"architecture {report['architecture']}, alpha {report['alpha']:g}; "
                   f"{len(report['rescaled'])} with their scaling folded into B, {len(report['permuted'])} q/k reordered for rope")


@main.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(), help="Output adapter directory.")
@click.option("--method", type=click.Choice(["cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]),
              default="cat", show_default=True, help="How to combine (see the description above).")
@click.option("--weights", callback=_parse_weights, help="Comma-separated weights, one per adapter (negative allowed) [default: 1 each].")
@click.option("--rank", type=int, help="svd: target rank K [default: the largest input rank].")
@click.option("--energy", type=float, help="svd: smallest rank keeping this fraction of the energy.")
@click.option("--density", type=float, help="ties, dare_*, magnitude_prune: fraction of values kept.")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True, help="ties, dare_ties.")
@click.option("--seed", type=int, default=0, show_default=True, help="dare_*: seed of the random masks.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (schema in the README).")
def combine(adapters, out, method, weights, rank, energy, density, majority_sign, seed, force, as_json) -> None:
    """Combine several adapters for the same base architecture into one PEFT adapter.

    \b
    Exact:
      cat    exactly Σ wᵢ·ΔWᵢ; the ranks add up.
      svd    the best rank-K approximation of Σ wᵢ·ΔWᵢ, from the stacked factors.
    As PEFT's add_weighted_adapter (A and B combined separately, so `linear` is NOT
    Σ wᵢ·ΔWᵢ: it has cross terms; use cat or svd for the sum):
      linear, ties, dare_linear, dare_ties, magnitude_prune   (equal ranks needed)

    A module missing from an input counts as zero there. The output has scaling 1 everywhere.
    """
    from .api import load_adapter, save_adapter
    from .ops.combine import combine_adapters, combine_report

    loaded = [load_adapter(a) for a in adapters]
    combined, report = combine_adapters(
        loaded, method=method, weights=weights, rank=rank, energy=energy, density=density,
        majority_sign=majority_sign, seed=seed,
    )
    save_adapter(combined, out, force=force, sources=loaded)
    if as_json:
        _print_json(combine_report(report, adapters, out))
    else:
        ranks = sorted({m["rank"] for m in report.modules.values()})
        click.echo(f"combined {len(adapters)} adapters ({method}) into {out}: {len(report.modules)} modules, rank(s) {ranks}")


class _progress_bar:
    """A byte-progress bar on stderr, shown only on a terminal; yields the callback (or None)."""

    def __init__(self, enabled: bool, label: str):
        self.enabled = enabled and sys.stderr.isatty()
        self.label = label
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return None
        return self.update

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, show_pos=False)
            self.bar.__enter__()
        self.bar.update(done - self.bar.pos)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


if __name__ == "__main__":  # python -m loratools.cli
    main()
