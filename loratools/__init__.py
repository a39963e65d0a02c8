"""loratools: LoRA adapters as artifacts — read, check, explain, convert, combine and merge them.

One function per command (info, validate, merge, export, svd, resize, convert, combine,
extract), each returning a Report: `report.to_dict()` is the command's --json document,
`report.render()` its text. Importing loratools does not import torch; functions that need
tensors import it when called.
"""

from .adapter import Adapter, Extra, LoraModule
from .api import combine, convert, export, extract, info, load_adapter, merge, resize, save_adapter, svd, validate
from .config import AdapterConfig
from .errors import LoraToolsError
from .report import Report

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
