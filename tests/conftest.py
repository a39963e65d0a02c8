"""Shared test helpers: fixture paths, running the real `loratools` command, PEFT as reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
ADAPTERS = FIXTURES / "adapters"
BASES = FIXTURES / "bases"

# Property tests: the "ci" profile (the default, what ./dev test and .ci/run use) replays one fixed,
# derandomized set of examples, the same on every run; LORATOOLS_FUZZ=random draws new ones, as
# many as LORATOOLS_FUZZ_EXAMPLES (default 2000) per test. Whatever it finds is pinned with @example.
FUZZ_PROFILE = os.environ.get("LORATOOLS_FUZZ", "ci")
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
settings.register_profile("random", max_examples=int(os.environ.get("LORATOOLS_FUZZ_EXAMPLES", "2000")), database=None,
                          print_blob=True, deadline=None)
settings.load_profile(FUZZ_PROFILE)

# fixture adapter -> tiny base family it was made on (see fixtures/make_fixtures.py)
ADAPTER_BASE = {
    "llama-basic": "llama",
    "llama-rslora-patterns": "llama",
    "llama-dora": "llama",
    "llama-embedding": "llama",
    "llama-legacy-bin": "llama",
    "gpt2-conv1d": "gpt2",
    "gpt2-lora-bias": "gpt2",
    "bert-modules-to-save": "bert",
}

# The console script installed beside this interpreter: tests run the command a user types.
LORATOOLS = str(Path(sys.executable).with_name("loratools"))


def run_cli(*args: str, env: dict | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [LORATOOLS, *map(str, args)], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300
    )


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str, code: int | None = None) -> None:
    """A user-facing failure: non-zero exit, exactly one `Error:` line, no traceback."""
    assert result.returncode != 0, result.stdout
    if code is not None:
        assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(params=sorted(ADAPTER_BASE))
def fixture_adapter(request) -> tuple[str, Path, str]:
    name = request.param
    return name, ADAPTERS / name, ADAPTER_BASE[name]
