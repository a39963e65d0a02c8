"""loratools: LoRA adapters as artifacts — read, check, explain, convert, combine and merge them.

Importing loratools does not import torch; functions that need tensors import it when called.
"""

from .adapter import Adapter, Extra, LoraModule
from .api import export, extract, load_adapter, merge, save_adapter
from .config import AdapterConfig
from .errors import LoraToolsError

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterConfig",
    "Extra",
    "LoraModule",
    "LoraToolsError",
    "load_adapter",
    "export",
    "extract",
    "merge",
    "save_adapter",
]
