"""Write outputs all-or-nothing: into a temporary sibling, moved into place at the end.

- A failed, interrupted (SIGINT/SIGTERM) or killed write leaves no output. A killed one leaves a
  hidden `.<name>.tmp-<pid>-*` sibling; the next write of the same output removes it once that
  process is gone.
- Whether an existing output may be replaced is decided when the output is moved into place, not
  when the work starts: without `force`, an output that appeared meanwhile (another run, another
  user) is left alone and this run fails; with `force`, the swap is one atomic rename.
- A write that fails (a full disk, a file-size limit, a read-only filesystem) is one line,
  `no-space` or `write-error`, and the temporary is removed.
- Inputs are never outputs: every writing command refuses an output that is, contains, or sits
  inside one of its inputs (`refuse_overlap`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import DiskError, LoraToolsError, OutputExistsError, UsageError


def check_output(out: str | os.PathLike, force: bool) -> Path:
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputExistsError(f"{out}: already exists (use --force to replace it)")
    return out


def refuse_overlap(out: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """OUT may not be an input, contain one, or sit inside an input directory: with --force that
    would delete what is being read. (A file beside a single-file input is fine.)"""
    target = Path(out).resolve()
    for given in inputs:
        p = Path(given).resolve()
        inside_input_dir = p.is_dir() and target.is_relative_to(p)
        if target == p or p.is_relative_to(target) or inside_input_dir:
            raise UsageError(f"{out}: overlaps an input ({p}); choose another output path")


def default_mode(directory: bool) -> int:
    """What a plain mkdir/open would give under the current umask (mkdtemp/mkstemp give 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False, mode: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; on success it becomes `out` (with `mode`,
    default: as mkdir would make it)."""
    out = check_output(out, force)
    _made(out, lambda: out.parent.mkdir(parents=True, exist_ok=True))
    remove_stale_temps(out)
    tmp = _made(out, lambda: Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent)))
    try:
        with _write_errors(out):
            os.chmod(tmp, default_mode(True) if mode is None else mode)
            yield tmp
            _commit(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(out: str | os.PathLike, force: bool = False, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary file path beside `out`; on success it becomes `out`."""
    out = check_output(out, force)
    if out.is_dir():
        raise OutputExistsError(f"{out}: is a directory; the output of a single-file input is a file")
    _made(out, lambda: out.parent.mkdir(parents=True, exist_ok=True))
    remove_stale_temps(out)
    fd, name = _made(out, lambda: tempfile.mkstemp(prefix=_temp_prefix(out), dir=out.parent))
    os.close(fd)
    tmp = Path(name)
    try:
        with _write_errors(out):
            os.chmod(tmp, default_mode(False) if mode is None else mode)
            yield tmp
            _commit(tmp, out, force)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- write errors -------------------------------------------------------------------------------

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def write_error(out: str | os.PathLike, detail: str, errnum: int | None = None) -> DiskError:
    """A failed write as one line: `no-space` for a full disk or quota, else `write-error` (an
    OSError too, for library callers)."""
    no_space = errnum in _NO_SPACE or any(f"os error {e})" in detail for e in _NO_SPACE)  # Rust's io::Error text
    return DiskError(f"{out}: {detail}; nothing was written", code="no-space" if no_space else "write-error", errnum=errnum)


def _made(out: Path, make):
    try:
        return make()
    except OSError as exc:
        raise write_error(out, f"cannot be created ({exc.strerror or exc})", exc.errno) from None


@contextmanager
def _write_errors(out: Path) -> Iterator[None]:
    """An OSError while writing (a full or failing disk, EFBIG, EROFS) becomes one line."""
    try:
        yield
    except LoraToolsError:
        raise
    except OSError as exc:
        where = f" ({os.path.basename(exc.filename)})" if isinstance(exc.filename, str) else ""
        raise write_error(out, f"writing failed: {exc.strerror or exc}{where}", exc.errno) from None


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-{os.getpid()}-"


def remove_stale_temps(out: Path) -> None:
    """Remove temporary siblings of `out` left by runs that were killed (their process is gone)."""
    prefix = f".{out.name}.tmp-"
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return
    for sibling in siblings:
        if not sibling.name.startswith(prefix):
            continue
        pid = sibling.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


# ---- space for an output ------------------------------------------------------------------------


def preallocate(fd: int, size: int, name: str) -> None:
    """Reserve a file's final size before writing it (Linux fallocate; elsewhere nothing).

    Appending to a file makes ext4 allocate blocks as it goes, which on our machines slowed
    writes 3-7x once a gigabyte was dirty; reserved up front, every write costs the same. And a
    disk without room for the output fails here, before any work, with a clear message."""
    err = _fallocate(fd, size) if size > 0 else 0
    if err in (errno.ENOSPC, errno.EDQUOT):
        raise DiskError(f"{name}: not enough disk space for the output ({size:,} bytes); nothing was written", code="no-space",
                        errnum=err)
    # other errors (EOPNOTSUPP...): a filesystem without fallocate is written the ordinary way


def _fallocate(fd: int, size: int) -> int:
    """fallocate(fd, 0, 0, size): 0 or the errno (ENOSYS where the C library has no fallocate)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return errno.ENOSYS
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    return 0 if fn(fd, 0, 0, size) == 0 else ctypes.get_errno()


# ---- the final move ----------------------------------------------------------------------------

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False when this system does not have it (then the caller falls back)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # kernel or filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _commit(tmp: Path, out: Path, force: bool) -> None:
    if not force or not (out.exists() or out.is_symlink()):
        try:
            if _renameat2(tmp, out, _RENAME_NOREPLACE):
                return
        except FileExistsError:
            if not force:
                raise OutputExistsError(f"{out}: appeared while loratools was writing it; left alone (use --force to replace it)") from None
        else:
            # No renameat2 here: a plain rename would silently replace an output that appeared meanwhile.
            if out.exists() or out.is_symlink():
                if not force:
                    raise OutputExistsError(f"{out}: appeared while loratools was writing it; left alone (use --force to replace it)")
            else:
                os.rename(tmp, out)
                return
    # --force and OUT exists: swap in one step where the system can, then drop the old one.
    if _renameat2(tmp, out, _RENAME_EXCHANGE):
        _remove(tmp)
        return
    if tmp.is_dir():
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
        os.rename(out, old / "old")
        os.rename(tmp, out)
        _remove(old)
    else:
        os.replace(tmp, out)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
