"""Write outputs all-or-nothing: into a temporary sibling, renamed into place at the end.

A failed or interrupted write leaves no output (only, at worst, a hidden `.<name>.tmp-*`
sibling that the next run does not mistake for a result); an existing output is replaced only
when the caller says so.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import OutputExistsError


def check_output(out: str | os.PathLike, force: bool) -> Path:
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputExistsError(f"{out}: already exists (use --force to replace it)")
    return out


@contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; on success it becomes `out`."""
    out = check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(new: Path, out: Path) -> None:
    # A directory cannot be swapped in one rename: move the old one aside first, then drop it.
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "old")
        os.rename(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, out)


@contextmanager
def atomic_file(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `out`; on success it replaces `out` in one rename."""
    out = check_output(out, force)
    if out.is_dir():
        raise OutputExistsError(f"{out}: is a directory; the output of a single-file input is a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
