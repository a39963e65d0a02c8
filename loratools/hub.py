"""The one place that talks to huggingface_hub: turn a repo id into local files.

An existing local path always wins. Otherwise `org/name` or `org/name@revision` is resolved
through huggingface_hub's own cache, offline mode (HF_HUB_OFFLINE) and token handling.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import HubError, InputNotFoundError, LoraToolsError
from .formats.checkpoint import OTHER_WEIGHTS

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")

ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
# For a base model: the safetensors weights and every small file, not other weight formats.
BASE_IGNORE_PATTERNS = [p for p in OTHER_WEIGHTS if p != "*.safetensors"] + ["original/*"]


def resolve(
    spec: str | os.PathLike, allow_patterns: list[str] | None = None, ignore_patterns: list[str] | None = None
) -> Path:
    """A local path for `spec`: the path itself if it exists, else a Hub snapshot directory."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    spec = os.fspath(spec)
    if not _REPO_ID.match(spec):
        raise InputNotFoundError(f"{spec}: no such file or directory")
    repo_id, _, revision = spec.partition("@")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(
            repo_id, revision=revision or None, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
        ))
    except LocalEntryNotFoundError:
        raise HubError(
            f"{spec}: not a local path, and not in the Hub cache (offline, or the Hub could not be reached)"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{spec}: the Hub repo has no revision {revision!r}") from None
    except GatedRepoError:
        raise HubError(f"{spec}: gated Hub repo; accept its terms and log in (huggingface-cli login)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{spec}: not a local path, and no such Hub repo (or it is private: log in)") from None
    except HfHubHTTPError as exc:
        raise HubError(f"{spec}: Hub request failed ({str(exc).splitlines()[0]})") from None
    except (OSError, ValueError) as exc:
        raise HubError(f"{spec}: could not resolve as a Hub repo ({exc})") from None


def local_model_type(name: str | None) -> str | None:
    """The model_type of the base an adapter names (base_model_name_or_path), when its config.json
    is already on this machine: a local directory, or the Hub cache. Never downloads; any problem
    just means "not known"."""
    if not isinstance(name, str) or not name or len(name) > 300:
        return None
    try:
        config = Path(name).expanduser() / "config.json"
        if not config.is_file():
            if not _REPO_ID.match(name):
                return None
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            if not isinstance(cached, str):
                return None
            config = Path(cached)
        from .formats.json_text import read_json_file

        model_type = read_json_file(config).get("model_type")
    except (LoraToolsError, OSError, ValueError, AttributeError, TypeError):
        return None
    return model_type if isinstance(model_type, str) else None
