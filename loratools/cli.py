"""The `loratools` command: parse options, call the command's one library function (api.py), print
its report — `report.render()`, or `report.to_dict()` with --json — and exit with its verdict.
The option choices come from the library's tables (ops/choices.py, arch).

Every LoraToolsError becomes `Error: <one line>` on stderr and a non-zero exit; usage errors
exit 2 (click's convention). `--debug` re-raises so the traceback shows. torch is never imported
here: the library imports it inside the functions that need tensors.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import click

from .arch import CONVERT_SCHEMES
from .arch.gguf import GGUF_ARCHS
from .errors import LoraToolsError, write_error_code
from .ops.choices import COMBINE_METHODS, DTYPES, EMBEDDING_MODES, MAJORITY_SIGNS


class _Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP, raised like Ctrl-C so that every partial output is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise _Terminated(signum)


# numpy's BLAS (OpenBLAS) starts a thread per core when numpy is imported, and those threads
# spin-wait after every call: for loratools' small products (a merge's row blocks, the r×r cores
# and tall r-column QRs of svd/combine) they only burn the other cores, and when another process
# keeps a core busy they make svd many times slower. So the command runs them single-threaded,
# set before numpy loads; a variable the user set is left alone. torch's pools (OpenMP, MKL) too,
# except for `extract`, whose dense SVDs of whole weight differences are worth several threads
# (a torch merge sets its own thread count per worker).
BLAS_THREADS = "OPENBLAS_NUM_THREADS"
TORCH_THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
MULTITHREADED_COMMANDS = {"extract"}


def single_threaded_pools(args: list[str]) -> None:
    """Set the thread variables above for the command in `args` (the CLI's arguments), unless
    numpy is already loaded (the library used in-process: too late, and not ours to change)."""
    if "numpy" in sys.modules:
        return
    command = next((a for a in args if not a.startswith("-")), None)
    for name in (BLAS_THREADS,) if command in MULTITHREADED_COMMANDS else (BLAS_THREADS, *TORCH_THREADS):
        os.environ.setdefault(name, "1")


class _Group(click.Group):
    def main(self, args=None, *rest, **kwargs):
        single_threaded_pools(sys.argv[1:] if args is None else list(args))
        return super().main(args, *rest, **kwargs)

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
        except OSError as exc:  # the system's, from a place that did not name it: still one line, exit 1
            if debug:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc} ({write_error_code(exc.errno)})", 1)
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


def _emit(report, as_json: bool, quiet: bool = False) -> None:
    """Print a command's report (its JSON, or its text and stderr notices) and exit with its verdict."""
    if as_json:
        _print_json(report.to_dict())
    elif not quiet:
        click.echo(report.render())
        for line in report.notices():
            click.echo(line, err=True)
    if report.exit_code:
        sys.exit(report.exit_code)


def _one_of(names) -> str:
    return f"{', '.join(names[:-1])} or {names[-1]}"


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
    from .api import info as run_info

    _emit(run_info(adapter, base=base, compare_base=compare_base), as_json)


@main.command()
@click.argument("base")
@click.argument("adapter")
@click.argument("out", type=click.Path())
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda or cuda:N.")
@click.option("--scale", default=1.0, show_default=True, type=float, help="Multiply every ΔW (-1 undoes an earlier merge).")
@click.option("--dtype", type=click.Choice(DTYPES),
              help="Output dtype of float tensors [default: keep each; bfloat16 for a quantized base].")
@click.option("--keep-quantized", is_flag=True, help="FP8 base: write changed weights re-quantized (new block scales), not dequantized.")
@click.option("--initial", help="PiSSA/OLoRA/CorDA/LoRA-GA adapter: the initial adapter PEFT saved before training.")
@click.option("--workers", type=int, help="Shards merged at once on CPU, one process each [default: one per core].")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--dry-run", is_flag=True, help="Plan only: list every output tensor (action, kernel, dtypes, adapter tensors feeding it); write nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (schema in the README).")
def merge(base, adapter, out, device, scale, dtype, keep_quantized, initial, workers, force, dry_run, quiet, as_json) -> None:
    """Merge ADAPTER into the BASE checkpoint and write OUT, like PEFT's merge_and_unload.

    BASE is a model directory (model.safetensors, or shards with model.safetensors.index.json),
    a single .safetensors file or a Hub repo id; OUT mirrors it (same shards, index, config and
    tokenizer files). Streams tensor by tensor; nothing appears at OUT unless the merge completes.
    A quantized BASE (bitsandbytes nf4/fp4, block-scaled FP8) is dequantized: OUT is a bfloat16
    model (see --dtype) without quantization_config.
    """
    from .api import merge as run_merge

    with _progress_bar(enabled=not quiet and not as_json and not dry_run, label="merging") as progress:
        report = run_merge(base, adapter, out, device=device, scale=scale, dtype=dtype, force=force, progress=progress,
                           workers=workers, keep_quantized=keep_quantized, initial=initial, dry_run=dry_run)
    _emit(report, as_json, quiet)


@main.command()
@click.argument("base")
@click.argument("finetuned")
@click.argument("out", type=click.Path())
@click.option("--rank", type=int, help="Rank K for every module.")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction of ‖ΔW‖² (0-1].")
@click.option("--max-rank", default=256, show_default=True, help="With --energy: the largest rank a module may get.")
@click.option("--modules", help="Comma-separated roles (attn_q, ffn_down...) or leaf names (q_proj...) [default: every changed Linear].")
@click.option("--embeddings", type=click.Choice(EMBEDDING_MODES), default=EMBEDDING_MODES[0], show_default=True,
              help="A changed token embedding: LoRA, stored whole (modules_to_save) or left out (reported).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Factor dtype [default: the weights' own].")
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

    chosen = [m.strip() for m in modules.split(",") if m.strip()] if modules else None
    _emit(run_extract(base, finetuned, out, rank=rank, energy=energy, max_rank=max_rank, modules=chosen,
                      embeddings=embeddings, device=device, dtype=dtype, exact=exact, force=force), as_json)


def _check_thresholds(ctx, param, value):
    for t in value:
        if not 0 < t <= 1:
            raise click.BadParameter(f"{t} is not in (0, 1]", param_hint="--threshold")
    return value


@main.command()
@click.argument("adapter")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (schema in the README).")
@click.option("--threshold", "thresholds", type=float, multiple=True, metavar="T", callback=_check_thresholds,
              help="Energy level for the energy rank (repeatable) [default: 0.9 and 0.99].")
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw normalised spectra per role to this PNG (needs matplotlib).")
@click.option("--force", is_flag=True, help="Replace the --plot file if it exists.")
def svd(adapter, as_json, thresholds, plot, force) -> None:
    """Effective rank of every module's ΔW = s·B·A, per module, role and layer.

    Singular values come from QR of the factors and an r×r SVD: exact, and ΔW is never formed.
    """
    from .api import svd as run_svd
    from .ops.svd import DEFAULT_THRESHOLDS

    _emit(run_svd(adapter, thresholds or DEFAULT_THRESHOLDS, plot=plot, force=force), as_json)


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
    from .api import resize as run_resize

    _emit(run_resize(adapter, out, rank=rank, energy=energy, force=force), as_json)


@main.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("--base", help="Also check against this base checkpoint (headers only).")
@click.option("--target", metavar="vllm[@VERSION]|sglang|llama.cpp",
              help="Also check what this serving runtime (at this release) refuses or serves differently, and what serving the ADAPTERS together needs.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (schema in the README).")
@click.option("--strict", is_flag=True, help="Warnings fail too.")
def validate(adapters, base, target, as_json, strict) -> None:
    """Check adapter files without loading a model. Exit 0: valid; 1: problems; 2: usage error.

    ADAPTERS are adapter directories or files in them (each directory is checked once), so
    pre-commit can pass changed files. Every problem is reported, each with a stable code.
    """
    from .api import validate as run_validate

    _emit(run_validate(adapters, base=base, target=target, strict=strict), as_json)


@main.command()
@click.argument("adapter")
@click.argument("out", type=click.Path())
@click.option("--from", "source", type=click.Choice(CONVERT_SCHEMES), help="Source naming scheme [default: detected].")
# No click default: the library tells --to given (refused with --to-lora) from --to left out.
@click.option("--to", "target", type=click.Choice(CONVERT_SCHEMES), help=f"Target naming scheme.  [default: {CONVERT_SCHEMES[0]}]")
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
def convert(adapter, out, source, target, head, drop_unmapped, base_model, to_lora, base, initial, rank, energy, force,
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
    from .api import convert as run_convert

    _emit(run_convert(adapter, out, to=target, source=source, head=head, drop_unmapped=drop_unmapped, base_model=base_model,
                      to_lora=to_lora, base=base, initial=initial, rank=rank, energy=energy, force=force), as_json)


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
@click.option("--base-arch", help=f"llama.cpp architecture: {_one_of(list(GGUF_ARCHS))} [default: the adapter's or the base's].")
@click.option("--base", help="Base model directory, config.json or Hub repo: only config.json is read (head counts, tied embeddings).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (schema in the README).")
def export(adapter, out, base_arch, base, force, as_json) -> None:
    """Write ADAPTER as a GGUF LoRA adapter (OUT.gguf) that llama.cpp loads with --lora.

    Every module's own scaling (rank/alpha patterns, rsLoRA) is folded into its B, since
    llama.cpp has one alpha per file; q/k rows follow llama.cpp's rotary order for LLaMA.
    """
    from .api import export as run_export

    _emit(run_export(adapter, out, base_arch=base_arch, base=base, force=force), as_json)


@main.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(), help="Output adapter directory.")
@click.option("--method", type=click.Choice(COMBINE_METHODS), default=COMBINE_METHODS[0], show_default=True,
              help="How to combine (see the description above).")
@click.option("--weights", callback=_parse_weights, help="Comma-separated weights, one per adapter (negative allowed) [default: 1 each].")
@click.option("--rank", type=int, help="svd: target rank K [default: the largest input rank].")
@click.option("--energy", type=float, help="svd: smallest rank keeping this fraction of the energy.")
@click.option("--density", type=float, help="ties, dare_*, magnitude_prune: fraction of values kept.")
@click.option("--majority-sign", type=click.Choice(MAJORITY_SIGNS), default=MAJORITY_SIGNS[0], show_default=True, help="ties, dare_ties.")
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
    from .api import combine as run_combine

    _emit(run_combine(adapters, out, method=method, weights=weights, rank=rank, energy=energy, density=density,
                      majority_sign=majority_sign, seed=seed, force=force), as_json)


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
