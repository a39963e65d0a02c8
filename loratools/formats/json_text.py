"""JSON from files users hand us, parsed so that no input can escape as an unexpected exception.

json.loads raises more than JSONDecodeError on hostile input: a 5000-digit integer exceeds
Python's int-conversion limit (ValueError) and 100k nested brackets exhaust the stack
(RecursionError). Every one of those is a broken file, reported as such.
"""

from __future__ import annotations

import json
from typing import Any


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
