"""One exception hierarchy for everything loratools reports to a user.

Every error a user can cause (a broken file, a bad option, a missing repo) is a LoraToolsError
whose message is one line that says what is wrong and, where it can, how to fix it. Each subclass
also inherits the matching builtin so library callers can catch ValueError, FileNotFoundError, ...
"""

from __future__ import annotations


class LoraToolsError(Exception):
    """Base class: the CLI prints `Error: <message>` and exits with `exit_code`."""

    exit_code = 1


class UsageError(LoraToolsError, ValueError):
    """An option value the library cannot act on (exit code 2, like click's usage errors)."""

    exit_code = 2


class InputNotFoundError(LoraToolsError, FileNotFoundError):
    """A path, file or Hub repo that should exist does not."""


class FormatError(LoraToolsError, ValueError):
    """A file exists but is not what it claims to be (truncated, bad header, bad pickle...)."""


class ConfigError(LoraToolsError, ValueError):
    """adapter_config.json (or a base config.json) is missing a field or has an invalid value."""


class ShapeError(LoraToolsError, ValueError):
    """Tensor shapes disagree with each other, with the config, or with the base model."""


class UnsupportedError(LoraToolsError, NotImplementedError):
    """Valid input that loratools does not handle (another PEFT method, an unknown architecture...)."""


class OutputExistsError(LoraToolsError, FileExistsError):
    """The output path exists and --force was not given."""


class HubError(LoraToolsError, OSError):
    """A Hub repo id could not be resolved to local files."""
