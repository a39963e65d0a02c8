"""Architecture knowledge as plain data (no torch): roles, per-family module tables, detection."""

from .roles import Layout, Role
from .tables import ARCHITECTURES, CONVERT_SCHEMES, Architecture, Head, ModuleTemplate, get_architecture
from .detect import Detection, ModuleRef, detect_from_config, detect_from_paths, family_from_evidence, locate

__all__ = [
    "ARCHITECTURES",
    "CONVERT_SCHEMES",
    "Architecture",
    "Detection",
    "Head",
    "Layout",
    "ModuleRef",
    "ModuleTemplate",
    "Role",
    "detect_from_config",
    "detect_from_paths",
    "family_from_evidence",
    "get_architecture",
    "locate",
]
