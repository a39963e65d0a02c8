"""JSON from files users hand us, parsed so that no input can escape as an unexpected exception.

json.loads raises more than JSONDecodeError on hostile input: a 5000-digit integer exceeds
Python's int-conversion limit (ValueError) and 100k nested brackets exhaust the stack
(RecursionError). Every one of those is a broken file, reported as such. Files are read through
read_json_file, which reads only regular files of bounded size (formats/files.py).
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import FormatError, LoraToolsError
from .files import MAX_JSON_BYTES, read_capped


def parse_json(data: bytes | str) -> Any:
    """The parsed value; raises ValueError with a one-line reason for anything that is not JSON."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(str(exc)) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise ValueError(str(exc).split(";")[0]) from None


def read_json_file(path, *, error: type[LoraToolsError] = FormatError, code: str | None = None,
                   limit: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON of file `path`: the one way loratools reads a JSON file from disk.

    Only a regular file of at most `limit` bytes is read (files.read_capped: `not-a-file`,
    `too-large`, `io-error`, `not-found`); content that is not JSON raises `error` with `code`,
    as `<name>: not valid JSON (<reason>)`."""
    data = read_capped(path, limit, "a JSON file")
    try:
        return parse_json(data)
    except ValueError as exc:
        raise error(f"{os.path.basename(os.fspath(path))}: not valid JSON ({exc})", code=code) from None
