"""Outputs never cost the user a file: overlap with inputs, outputs that appear meanwhile,
SIGTERM, killed runs, inputs changed under our feet, and the permissions of what we write."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import loratools
from loratools.errors import FormatError, OutputExistsError
from tests.conftest import ADAPTERS, BASES, assert_clean_error, run_cli
from tests.merged import digest


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_writing_commands_never_overwrite_their_inputs(tmp_path, where):
    adapter = _copy(ADAPTERS / "llama-basic", tmp_path / "work" / "adapter")
    (tmp_path / "work" / "notes.txt").write_text("unrelated")
    out = {"same": adapter, "parent": tmp_path / "work", "inside": adapter / "sub"}[where]
    before = digest(tmp_path / "work")
    for args in (
        ("combine", adapter, ADAPTERS / "llama-rslora-patterns", "--out", out, "--force"),
        ("resize", adapter, out, "--rank", "1", "--force"),
        ("convert", adapter, out, "--to", "bert", "--drop-unmapped", "--force"),
        ("merge", BASES / "llama", adapter, out, "--force"),
    ):
        assert_clean_error(run_cli(*args), "overlaps an input", code=2)
        assert digest(tmp_path / "work") == before, args[0]


def test_an_output_that_appears_meanwhile_is_left_alone(tmp_path):
    out = tmp_path / "out"

    def someone_else_writes_out(done, total):
        if not out.exists():
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")

    with pytest.raises(OutputExistsError, match="appeared while"):
        loratools.merge(BASES / "llama-sharded", ADAPTERS / "llama-basic", out, progress=someone_else_writes_out)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind
    # With --force the same race replaces it, in one step.
    shutil.rmtree(out)
    loratools.merge(BASES / "llama-sharded", ADAPTERS / "llama-basic", out, force=True, progress=someone_else_writes_out)
    assert not (out / "theirs.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_single_file_output_that_appears_meanwhile_is_left_alone(tmp_path):
    out = tmp_path / "merged.safetensors"

    def someone_else_writes_out(done, total):
        if not out.exists():
            out.write_text("theirs")

    with pytest.raises(OutputExistsError):
        loratools.merge(BASES / "gpt2" / "model.safetensors", ADAPTERS / "gpt2-conv1d", out, progress=someone_else_writes_out)
    assert out.read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]


# SIGINT as in a terminal: a test run started in the background by a non-interactive shell
# inherits SIGINT ignored, and Python then leaves it ignored in every child.
SLOW_MERGE = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from loratools.ops.merge import shard as merge_shard
    real = merge_shard.write_shard
    def slow(*args, **kwargs):
        time.sleep(60)
        return real(*args, **kwargs)
    merge_shard.write_shard = slow
    from loratools.cli import main
    sys.argv = ["loratools", "merge", *sys.argv[1:]]
    main()
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_merge_leaves_nothing(tmp_path, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, str(BASES / "llama"), str(ADAPTERS / "llama-basic"), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert stderr.strip().startswith("Error: ") and "nothing was written" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".out.tmp-{os.getpid()}-def456"  # a run still going: not ours to remove
    live.mkdir()
    unrelated = tmp_path / ".other.tmp-1-x"
    unrelated.mkdir()
    assert run_cli("merge", BASES / "llama", ADAPTERS / "llama-basic", tmp_path / "out").returncode == 0
    assert not stale.exists() and live.exists() and unrelated.exists()


def test_output_permissions_mirror_the_base(tmp_path):
    base = _copy(BASES / "llama-sharded", tmp_path / "base")
    os.chmod(base, 0o750)
    for f in base.iterdir():
        os.chmod(f, 0o640)
    assert run_cli("merge", base, ADAPTERS / "llama-basic", tmp_path / "out").returncode == 0
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "out").iterdir()} == {f.name: 0o640 for f in base.iterdir()}
    single = tmp_path / "single.safetensors"
    assert run_cli("merge", BASES / "gpt2" / "model.safetensors", ADAPTERS / "gpt2-conv1d", single).returncode == 0
    assert single.stat().st_mode & 0o777 == (BASES / "gpt2" / "model.safetensors").stat().st_mode & 0o777


def test_adapter_outputs_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    assert run_cli("resize", ADAPTERS / "llama-basic", tmp_path / "r", "--rank", "1").returncode == 0
    assert (tmp_path / "r").stat().st_mode & 0o777 == 0o777 & ~umask
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in (tmp_path / "r").iterdir())


def test_an_adapter_rewritten_during_a_merge_is_detected(tmp_path):
    adapter = _copy(ADAPTERS / "llama-basic", tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    original = weights.read_bytes()

    def rewrite(done, total):  # same size, new content: a mixed model unless noticed
        weights.write_bytes(original[:-4] + b"\0\0\0\0")

    with pytest.raises(FormatError, match="changed on disk"):
        loratools.merge(BASES / "llama-sharded", adapter, tmp_path / "out", progress=rewrite)
    assert not (tmp_path / "out").exists()


def test_a_base_truncated_during_a_merge_is_a_clean_error(tmp_path):
    base = _copy(BASES / "llama-sharded", tmp_path / "base")
    shards = sorted(base.glob("*.safetensors"))

    def truncate(done, total):
        with open(shards[-1], "r+b") as fh:
            fh.truncate(100)

    with pytest.raises(FormatError):
        loratools.merge(base, ADAPTERS / "llama-basic", tmp_path / "out", progress=truncate)
    assert not (tmp_path / "out").exists()
