"""One exception hierarchy for everything loratools reports to a user.

Every error a user can cause (a broken file, a bad option, a missing repo) is a LoraToolsError
whose message is one line that says what is wrong and, where it can, how to fix it. Each subclass
also inherits the matching builtin so library callers can catch ValueError, FileNotFoundError, ...
"""

from __future__ import annotations

import errno as _errno


class LoraToolsError(Exception):
    """Base class: the CLI prints `Error: <message>` and exits with `exit_code`.

    `code` is a short stable identifier of the problem (`validate` reports it); subclasses set a
    default and raise sites may give a more precise one.
    """

    exit_code = 1
    code = "error"

    def __init__(self, message: str = "", *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class UsageError(LoraToolsError, ValueError):
    """An option value the library cannot act on (exit code 2, like click's usage errors)."""

    code = "usage"

    exit_code = 2


class InputNotFoundError(LoraToolsError, FileNotFoundError):
    """A path, file or Hub repo that should exist does not."""

    code = "not-found"


class FormatError(LoraToolsError, ValueError):
    """A file exists but is not what it claims to be (truncated, bad header, bad pickle...)."""

    code = "format"


class ConfigError(LoraToolsError, ValueError):
    """adapter_config.json (or a base config.json) is missing a field or has an invalid value."""

    code = "config"


class ShapeError(LoraToolsError, ValueError):
    """Tensor shapes disagree with each other, with the config, or with the base model."""

    code = "shape"


class UnsupportedError(LoraToolsError, NotImplementedError):
    """Valid input that loratools does not handle (another PEFT method, an unknown architecture...)."""

    code = "unsupported"


class OutputExistsError(LoraToolsError, FileExistsError):
    """The output path exists and --force was not given."""

    code = "output-exists"


class HubError(LoraToolsError, OSError):
    """A Hub repo id could not be resolved to local files."""

    code = "hub"


class DiskError(LoraToolsError, OSError):
    """A file could not be read or written (a full or failing disk, permissions, a file-size limit);
    `errno` is the system's, when there is one."""

    code = "io-error"

    def __init__(self, message: str = "", *, code: str | None = None, errnum: int | None = None):
        super().__init__(message, code=code)
        self.errno = errnum


# The one table of what a failed write is called, by the system's errno; anything else is
# `write-error` (EIO of a failing disk, EFBIG of a file-size limit, ENOENT under /proc...).
WRITE_ERROR_CODES = {
    _errno.ENOSPC: "no-space",  # a full disk
    _errno.EDQUOT: "no-space",  # a full quota
    _errno.ENAMETOOLONG: "name-too-long",
    _errno.EROFS: "read-only",
    _errno.EACCES: "permission-denied",
    _errno.EPERM: "permission-denied",
}


def write_error_code(errnum: int | None) -> str:
    return WRITE_ERROR_CODES.get(errnum, "write-error")
