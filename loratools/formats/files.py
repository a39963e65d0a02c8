"""Opening the files users hand us, so that no path can hang, exhaust memory or end in an OSError.

A path can name something other than a file: a FIFO (reading it blocks for ever, and so does a
plain open), /dev/zero or /dev/urandom (endless), a directory, a socket. Every input loratools
reads goes through `open_regular`: the open cannot block (O_NONBLOCK), and what was opened is
checked with fstat on the descriptor itself, so a path swapped for something else between a check
and the read changes nothing. A symlink to a regular file is fine (the Hub cache is made of them).
Small files (JSON) are read whole by `read_capped`, which refuses one above its cap before
reading it. Read failures (EIO of a failing disk, permissions) are one-line errors too.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from ..errors import DiskError, FormatError, InputNotFoundError

# adapter_config.json, a base's config.json, model.safetensors.index.json: real ones are far
# smaller (the index of a 671B model is ~9 MB; 20,000 rank patterns of 1,000 characters, the most
# a config may hold, ~20 MB).
MAX_JSON_BYTES = 64 << 20

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def not_a_file(path: str, mode: int) -> FormatError:
    return FormatError(f"{path}: is {file_kind(mode)}, not a regular file; loratools reads only regular files "
                       "(a symlink to one is fine)", code="not-a-file")


def read_error(path: str, exc: OSError) -> DiskError:
    return DiskError(f"{path}: cannot be read ({exc.strerror or exc})", code="io-error", errnum=exc.errno)


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` open for reading (buffered), once it is known to be a regular file."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode  # a device is refused before it is even opened
        if not stat.S_ISREG(mode):
            raise not_a_file(path, mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputNotFoundError(f"{path}: no such file") from None
    except OSError as exc:
        raise read_error(path, exc) from None
    try:
        mode = os.fstat(fd).st_mode  # what was opened, whatever the path names now
        if not stat.S_ISREG(mode):
            raise not_a_file(path, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The whole content of regular file `path`, refused (`too-large`) above `limit` bytes.
    `what` names the kind of file in that message ("a JSON file")."""
    path = os.fspath(path)
    with open_regular(path) as fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            data = b"" if size > limit else fh.read(limit + 1)  # + 1: a file that grew meanwhile
        except OSError as exc:
            raise read_error(path, exc) from None
    if size > limit or len(data) > limit:
        raise FormatError(f"{path}: {max(size, len(data)):,} bytes, more than the {_size(limit)} loratools reads from "
                          f"{what}; refused", code="too-large")
    return data


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n:,} bytes"
