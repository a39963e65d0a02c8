"""What every command returns: one Report, whose to_dict() is the `--json` document and whose
render() is the text the command prints.

Each command's report is a dataclass subclass with its own fields (ops/info.py InfoReport,
ops/merge/run.py MergeReport, ...). By default to_dict() lists those fields in order, nested
dataclasses as dicts, after `schema_version`; a report whose JSON is derived from its fields
(summaries, a base described from its checkpoint) overrides `_json()`. No torch, no numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any

SCHEMA_VERSION = 1  # of every command's --json document; bumped on any incompatible change


@dataclass
class Report:
    def to_dict(self) -> dict[str, Any]:
        """The command's `--json` document (schemas in the README)."""
        return {"schema_version": SCHEMA_VERSION, **self._json()}

    def _json(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

    def render(self) -> str:
        """The command's text output."""
        raise NotImplementedError

    def notices(self) -> list[str]:
        """Lines the command prints on stderr beside its text (not with --json or --quiet)."""
        return []

    @property
    def ok(self) -> bool:
        """False when the command's verdict is a failure (validate: problems found)."""
        return True

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def plain(value: Any) -> Any:
    """`value` with every dataclass in it turned into a dict of its fields (JSON-ready)."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value
