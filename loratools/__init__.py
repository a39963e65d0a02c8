"""loratools: LoRA adapters as artifacts — read, check, explain, convert, combine and merge them.

One function per command (info, validate, merge, export, svd, resize, convert, combine,
extract), each returning a Report: `report.to_dict()` is the command's --json document,
`report.render()` its text. Importing loratools imports neither numpy nor torch; the names
below are loaded on first use, and functions that need tensors import torch when called.
"""

from .errors import LoraToolsError

# Everything else is imported on first use (PEP 562): `import loratools` and `loratools --help`
# stay free of numpy and torch (see cli.py for why numpy must not load before the CLI starts).
_LAZY = {
    "Adapter": "adapter", "Extra": "adapter", "LoraModule": "adapter",
    "AdapterConfig": "config",
    "Report": "report",
    **{name: "api" for name in ("combine", "convert", "export", "extract", "info", "load_adapter", "merge", "resize",
                                "save_adapter", "svd", "validate")},
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # found directly from now on
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterConfig",
    "Extra",
    "LoraModule",
    "LoraToolsError",
    "Report",
    "combine",
    "convert",
    "export",
    "extract",
    "info",
    "load_adapter",
    "merge",
    "resize",
    "save_adapter",
    "svd",
    "validate",
]
