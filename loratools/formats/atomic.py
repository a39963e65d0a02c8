"""Write outputs all-or-nothing: into a temporary sibling, moved into place at the end.

- A failed, interrupted (SIGINT/SIGTERM) or killed write leaves no output. A killed one leaves a
  hidden `.<name>.tmp-<pid>-*` sibling; the next write of the same output removes it once that
  process is gone.
- Whether an existing output may be replaced is decided when the output is moved into place, not
  when the work starts: without `force`, an output that appeared meanwhile (another run, another
  user) is left alone and this run fails; with `force`, the swap is one atomic rename.
- A write that fails is one line whose code comes from one table (errors.WRITE_ERROR_CODES:
  `no-space`, `name-too-long`, `read-only`, `permission-denied`, else `write-error`), and the
  temporary is removed. Files are written whole (`write_all`: a short write goes on where it
  stopped, a write of nothing is an error) and their size checked against what was written.
- Inputs are never outputs: every writing command refuses an output that is, contains, or sits
  inside one of its inputs (`refuse_overlap`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import DiskError, LoraToolsError, OutputExistsError, UsageError, write_error_code


def check_output(out: str | os.PathLike, force: bool) -> Path:
    out = Path(out)
    if _made(out, lambda: out.exists() or out.is_symlink()) and not force:  # ENAMETOOLONG, EACCES on the way
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

def write_error(out: str | os.PathLike, detail: str, errnum: int | None = None) -> DiskError:
    """A failed write as one line, its code from errors.WRITE_ERROR_CODES (an OSError too, for
    library callers)."""
    return DiskError(f"{out}: {detail}; nothing was written", code=write_error_code(errnum), errnum=errnum)


def write_all(fd: int, data) -> int:
    """Write every byte of `data` to descriptor `fd`: a short write goes on where it stopped, a
    write that takes nothing is an error (EIO) rather than a loop. Returns the bytes written."""
    view = memoryview(data).cast("B")
    total = view.nbytes
    while view.nbytes:
        n = os.write(fd, view)
        if not n:
            raise OSError(errno.EIO, "the disk took no bytes of a write")
        view = view[n:]
    return total


def create(path: str | os.PathLike, mode: int | None = None) -> int:
    """Open a new (or emptied) file `path` for writing and return its descriptor: every file of an
    output is created here, with os.open, so that a failure to create it (EROFS, ENOSPC for the
    inode, EACCES) is an OSError that _write_errors turns into one line."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666 if mode is None else mode)


def write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """A file `path` holding exactly `data` (inside a temporary of atomic_dir/atomic_file); one
    that exists is replaced (emptied first)."""
    fd = create(path, mode)
    try:
        write_all(fd, data)
        check_size(path, len(data), fd)
    finally:
        os.close(fd)


def copy_regular(src: str | os.PathLike, dst: str | os.PathLike, mode: int | None = None) -> int:
    """Copy regular file `src` (a symlink to one is fine) to a new file `dst`: what is opened is
    checked to be a regular file (`not-a-file`: a FIFO, /dev/zero...), and exactly the size it
    has when opened is copied, never more. Returns the bytes copied."""
    from .files import open_regular, read_error

    with open_regular(src) as fh:
        size = os.fstat(fh.fileno()).st_size
        fd = create(dst, mode)
        try:
            done = 0
            while done < size:
                try:
                    block = fh.read(min(16 << 20, size - done))
                except OSError as exc:
                    raise read_error(os.fspath(src), exc) from None
                if not block:
                    raise LoraToolsError(f"{src}: ended early while being copied (truncated meanwhile?); nothing was written",
                                         code="input-changed")
                done += write_all(fd, block)
            check_size(dst, size, fd)
        finally:
            os.close(fd)
    return size


def check_size(path: str | os.PathLike, expected: int, fd: int | None = None) -> None:
    """The file holds `expected` bytes: a writer that lost bytes without an error (a disk that
    filled up under a library's own I/O) fails here, not in the next program that reads it."""
    size = os.fstat(fd).st_size if fd is not None else os.stat(path).st_size
    if size != expected:
        raise OSError(errno.EIO, f"{size:,} bytes on disk where {expected:,} were written", os.fspath(path))


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


def _temp_stem(out: Path) -> str:
    """`.<name>.tmp-`: a name near the system's 255-byte limit is shortened (its start and a
    hash), so that the temporary's name fits wherever OUT's does."""
    name = out.name
    if len(os.fsencode(name)) > 200:
        digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:12]
        name = os.fsencode(name)[:160].decode("utf-8", "ignore") + "~" + digest
    return f".{name}.tmp-"


def _temp_prefix(out: Path) -> str:
    return f"{_temp_stem(out)}{os.getpid()}-"


def remove_stale_temps(out: Path) -> None:
    """Remove temporary siblings of `out` left by runs that were killed (their process is gone)."""
    prefix = _temp_stem(out)
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
