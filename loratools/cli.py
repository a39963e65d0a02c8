"""The `loratools` command: parse options, call one library function, print the result.

Every LoraToolsError becomes `Error: <one line>` on stderr and a non-zero exit; usage errors
exit 2 (click's convention). `--debug` re-raises so the traceback shows. torch is never imported
here: the library imports it inside the functions that need tensors.
"""

from __future__ import annotations

import json
import sys

import click

from .errors import LoraToolsError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        debug = "--debug" in sys.argv[1:] or (ctx.params or {}).get("debug", False)
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except LoraToolsError as exc:
            if debug:
                raise
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
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
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (schema in the README).")
def info(adapter: str, as_json: bool) -> None:
    """Describe an adapter: architecture, ranks, scaling, targets, parameters, extra tensors.

    Reads only the config and the safetensors header; no tensor is loaded.
    """
    from .api import load_adapter
    from .ops.info import adapter_info, render_info

    report = adapter_info(load_adapter(adapter))
    _print_json(report) if as_json else click.echo(render_info(report))


if __name__ == "__main__":  # python -m loratools.cli
    main()
