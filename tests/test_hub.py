"""Hub repo ids resolve through a real huggingface_hub cache, offline; local paths win."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ADAPTERS, assert_clean_error, run_cli
from tests.hub_cache import add_snapshot

MAIN = "a" * 40
V1 = "b" * 40


def _files(name: str) -> dict:
    d = ADAPTERS / name
    return {p.name: p for p in d.iterdir()}


@pytest.fixture
def hub_cache(tmp_path):
    cache = tmp_path / "hub"
    add_snapshot(cache, "loratools-test/tiny-adapter", MAIN, _files("llama-basic"))
    add_snapshot(cache, "loratools-test/tiny-adapter", V1, _files("gpt2-conv1d"), refs=("v1",))
    return cache


def info(spec, cache, cwd=None):
    result = run_cli("info", "--json", spec, env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}, cwd=cwd)
    return result


def test_the_cache_is_one_huggingface_hub_recognises(hub_cache):
    code = (
        "import sys; from huggingface_hub import scan_cache_dir;"
        "info = scan_cache_dir(sys.argv[1]);"
        "print(sorted((r.repo_id, len(r.revisions)) for r in info.repos), len(info.warnings))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(hub_cache)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[('loratools-test/tiny-adapter', 2)] 0"


def test_repo_id_resolves_from_the_cache(hub_cache):
    result = info("loratools-test/tiny-adapter", hub_cache)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["architecture"] == "llama" and report["num_modules"] == 14
    assert report["adapter"] == "loratools-test/tiny-adapter"
    assert f"snapshots/{MAIN}" in report["file"]["path"]


@pytest.mark.parametrize("revision", ["v1", V1])
def test_revision_by_ref_or_commit(hub_cache, revision):
    result = info(f"loratools-test/tiny-adapter@{revision}", hub_cache)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["architecture"] == "gpt2"


def test_local_path_wins_over_repo_id(hub_cache, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(ADAPTERS / "bert-modules-to-save", work / "loratools-test" / "tiny-adapter")
    result = info("loratools-test/tiny-adapter", hub_cache, cwd=work)
    assert result.returncode == 0 and json.loads(result.stdout)["architecture"] == "bert"


def test_repo_not_in_cache_is_a_clean_error(hub_cache):
    assert_clean_error(info("loratools-test/nothing-here", hub_cache), "not in the Hub cache", code=1)
    assert_clean_error(info("loratools-test/tiny-adapter@v9", hub_cache), "loratools-test/tiny-adapter@v9", code=1)


def test_library_api_resolves_repo_ids(hub_cache, monkeypatch):
    code = (
        "import loratools; a = loratools.load_adapter('loratools-test/tiny-adapter@v1');"
        "print(a.architecture, len(a.modules))"
    )
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "gpt2 8", out.stderr
