"""Failing disks and hostile outputs for every writing command: each failure is one `Error:` line
with a stable code (errors.WRITE_ERROR_CODES), exit 1, and leaves no OUT and no temporary; plus
the inputs those commands must refuse before they write (NaN in export and --initial, extract of
nothing, integer weights, --base-arch against the adapter's evidence, orphan FP8 scales, base
files that are not regular files).

Faults are injected in-process (monkeypatch): the tests may run as root, where a read-only
directory made with chmod does not deny anything, and no tmpfs is mounted for a full disk."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import loratools
from loratools.errors import LoraToolsError
from tests.broken import CONFIG, WEIGHTS, copy_adapter
from tests.conftest import ADAPTERS, BASES, assert_clean_error, run_cli
from tests.test_hostile import Q0, assert_nothing_written, base_with, nan_adapter


@pytest.fixture(autouse=True)
def _merge_in_this_process():
    """Merge's shards in this process, not forked workers: a fault injected into os.write would
    otherwise also break the pipe a worker reports through (tests/test_outputs.py and
    test_merge_paths.py cover the workers)."""
    from loratools.ops.merge import workers as shard_workers

    with pytest.MonkeyPatch.context() as patch:  # not the test's own monkeypatch, which tests undo
        patch.setattr(shard_workers, "can_fork", lambda: False)
        yield


def run_in_process(capsys, *args) -> tuple[int, str, str]:
    """The `loratools` command in this process (so that monkeypatched faults reach it):
    (exit code, stdout, stderr)."""
    from loratools.cli import main

    capsys.readouterr()
    try:
        main(list(map(str, args)), prog_name="loratools")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "unexpected" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def only(directory: Path, *names: str) -> None:
    """`directory` holds exactly `names`: no output, no temporary (whatever its name)."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)


# ---- 1. export: finite tensors, a bounded config.json, a checked atomic write ----------------------


def test_export_refuses_non_finite_factors(tmp_path):
    adapter, out = nan_adapter(tmp_path), tmp_path / "out.gguf"
    result = run_cli("export", adapter, out, "--base", BASES / "llama")
    assert_clean_error(result, "lora_a contains NaN or Inf", f"nothing was written to {out}", code=1)
    assert_nothing_written(out)


def test_export_refuses_a_scaling_that_overflows_float32(tmp_path):
    adapter = copy_adapter(tmp_path, "llama-rslora-patterns")  # rsLoRA: every B is multiplied by √r·... > 1
    tensors = load_file(str(adapter / WEIGHTS))
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    tensors[key] = np.full_like(tensors[key], 3e38)  # finite, but not once the scaling is folded in
    save_file(tensors, str(adapter / WEIGHTS), metadata={"format": "pt"})
    out = tmp_path / "out.gguf"
    result = run_cli("export", adapter, out, "--base", BASES / "llama")
    assert_clean_error(result, "lora_b contains NaN or Inf", code=1)
    assert_nothing_written(out)


@pytest.mark.parametrize("kind", ["directory", "dev-zero"])
def test_export_base_config_that_is_not_a_regular_file(tmp_path, kind):
    base = tmp_path / "base"
    shutil.copytree(BASES / "llama", base)
    (base / "config.json").unlink()
    if kind == "directory":
        (base / "config.json").mkdir()
    else:
        (base / "config.json").symlink_to("/dev/zero")
    out = tmp_path / "out.gguf"
    result = run_cli("export", ADAPTERS / "llama-basic", out, "--base", base)
    assert_clean_error(result, "config.json: is a", "not a regular file", code=1)
    assert_nothing_written(out)


class _FailingFile:
    """A file whose writes fail (`error`) once `budget` bytes went through."""

    def __init__(self, fh, budget: int, error: int):
        self._fh, self._budget, self._error = fh, budget, error

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self._budget:
            raise OSError(self._error, os.strerror(self._error))
        self._budget -= n
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _gguf_open(monkeypatch, budget: int, error: int) -> None:
    import builtins

    from gguf import gguf_writer

    monkeypatch.setattr(gguf_writer, "open", lambda *a, **k: _FailingFile(builtins.open(*a, **k), budget, error),
                        raising=False)


@pytest.mark.parametrize("budget", [0, 100])
def test_export_to_a_full_disk_is_no_space(tmp_path, monkeypatch, capsys, budget):
    """ENOSPC injected at the GGUF writer's write calls (monkeypatch; no tmpfs needed)."""
    _gguf_open(monkeypatch, budget, errno.ENOSPC)
    out = tmp_path / "out.gguf"
    with pytest.raises(LoraToolsError) as caught:
        loratools.export(ADAPTERS / "llama-basic", out, base=BASES / "llama")
    assert caught.value.code == "no-space"
    code, _, err = run_in_process(capsys, "export", ADAPTERS / "llama-basic", out, "--base", BASES / "llama")
    assert_one_line_error(code, err, f"{out}: ", "No space left on device", "nothing was written")
    only(tmp_path)


def test_bytes_acknowledged_but_lost_are_a_write_error(tmp_path, monkeypatch, capsys):
    """os.write says it wrote what it was given and drops it: the written size is checked
    before OUT appears."""
    monkeypatch.setattr(os, "write", lambda fd, data: memoryview(data).nbytes)
    out = tmp_path / "out"
    code, _, err = run_in_process(capsys, "convert", ADAPTERS / "llama-basic", out, "--to-lora")
    monkeypatch.undo()
    assert_one_line_error(code, err, "bytes on disk where", "were written", "nothing was written")
    only(tmp_path)


# ---- 4. --base-arch against the adapter's own evidence --------------------------------------------


def _without_recorded_class(tmp_path: Path, name: str = "llama-basic") -> Path:
    adapter = copy_adapter(tmp_path, name)
    config = json.loads((adapter / CONFIG).read_text())
    config.pop("auto_mapping", None)
    (adapter / CONFIG).write_text(json.dumps(config))
    return adapter


def test_export_base_arch_contradicting_the_recorded_class(tmp_path):
    out = tmp_path / "out.gguf"
    result = run_cli("export", ADAPTERS / "llama-basic", out, "--base-arch", "qwen2")
    assert_clean_error(result, "--base-arch qwen2: the adapter is llama", "LlamaForCausalLM", code=1)
    assert_nothing_written(out)


def test_export_base_arch_of_another_naming_scheme(tmp_path):
    out = tmp_path / "out.gguf"
    adapter = _without_recorded_class(tmp_path, "gpt2-conv1d")
    for given in (ADAPTERS / "gpt2-conv1d", adapter):
        result = run_cli("export", given, out, "--base-arch", "qwen2")
        assert_clean_error(result, "--base-arch qwen2: ", "gpt2", code=1)
        assert_nothing_written(out)


def test_export_base_arch_where_names_leave_the_family_open(tmp_path):
    """LLaMA and Qwen2 name their modules alike: without a recorded class, qwen2 is accepted."""
    out = tmp_path / "out.gguf"
    result = run_cli("export", _without_recorded_class(tmp_path), out, "--base-arch", "qwen2")
    assert result.returncode == 0, result.stderr
    assert out.is_file()


def test_export_base_arch_mistral_on_llama_is_llama_for_llama_cpp(tmp_path):
    out = tmp_path / "out.gguf"
    result = run_cli("export", ADAPTERS / "llama-basic", out, "--base-arch", "mistral", "--base", BASES / "llama")
    assert result.returncode == 0, result.stderr


# ---- 2. every OS error of a write is one line with a stable code ----------------------------------


WRITERS = {
    "convert": lambda out: ["convert", ADAPTERS / "llama-basic", out, "--to-lora"],
    "resize": lambda out: ["resize", ADAPTERS / "llama-basic", out, "--rank", "2"],
    "combine": lambda out: ["combine", ADAPTERS / "llama-basic", ADAPTERS / "llama-rslora-patterns", "--out", out],
    "extract": lambda out: ["extract", BASES / "llama", BASES_TUNED, out, "--rank", "2"],
    "merge": lambda out: ["merge", BASES / "llama", ADAPTERS / "llama-basic", out],
    # shards, an index and a config.json rewritten for the new dtype: every kind of file merge writes
    "merge-sharded": lambda out: ["merge", BASES / "llama-sharded", ADAPTERS / "llama-basic", out, "--dtype", "bfloat16"],
    "export": lambda out: ["export", ADAPTERS / "llama-basic", f"{out}.gguf", "--base", BASES / "llama"],
}
BASES_TUNED: Path | None = None  # set by _tuned_base


@pytest.fixture(scope="module", autouse=True)
def _tuned_base(tmp_path_factory):
    """A fine-tune of the tiny LLaMA (one weight changed) for extract."""
    global BASES_TUNED
    root = tmp_path_factory.mktemp("tuned")
    tensors = load_file(str(BASES / "llama" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key] + np.float32(0.01) * np.outer(np.arange(tensors[key].shape[0]), np.ones(tensors[key].shape[1])).astype(tensors[key].dtype)
    shutil.copytree(BASES / "llama", root / "tuned")
    save_file(tensors, str(root / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    BASES_TUNED = root / "tuned"
    yield


def _out_name(out: Path, command: str) -> Path:
    return out.with_name(out.name + ".gguf") if command == "export" else out


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_an_out_name_too_long_for_the_system(tmp_path, command):
    out = tmp_path / ("n" * 260)
    result = run_cli(*WRITERS[command](out))
    assert_clean_error(result, "File name too long", code=1)
    assert "unexpected" not in result.stderr
    only(tmp_path)


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_an_out_name_near_the_limit_is_written(tmp_path, command):
    """A name of 245 bytes fits; its temporary (a longer name) is shortened to fit as well."""
    out = tmp_path / ("n" * (245 - (5 if command == "export" else 0)))
    result = run_cli(*WRITERS[command](out))
    assert result.returncode == 0, result.stderr
    only(tmp_path, _out_name(out, command).name)


@pytest.mark.parametrize("where", ["/proc/loratools-out", "/sys/loratools-out"])
@pytest.mark.parametrize("command", ["convert", "merge", "export"])
def test_an_out_under_a_kernel_filesystem(tmp_path, where, command):
    result = run_cli(*WRITERS[command](Path(where)))
    assert_clean_error(result, "loratools-out", "nothing was written", code=1)
    assert not os.path.exists(where) and not os.path.exists(where + ".gguf")


@pytest.mark.skipif(os.geteuid() == 0, reason="root is not denied by directory permissions")
@pytest.mark.parametrize("command", sorted(WRITERS))
def test_a_read_only_out_directory(tmp_path, command):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        result = run_cli(*WRITERS[command](parent / "out"))
        assert_clean_error(result, "Permission denied", code=1)
        only(parent)
    finally:
        parent.chmod(0o755)


ERRORS = [(errno.EROFS, "read-only"), (errno.EACCES, "permission-denied"), (errno.ENOSPC, "no-space"),
          (errno.ENAMETOOLONG, "name-too-long"), (errno.EIO, "write-error")]


@pytest.mark.parametrize("command, error, code", [(c, *e) for c in sorted(WRITERS) for e in ERRORS[:2]]
                         + [("convert", *e) for e in ERRORS[2:]])
@pytest.mark.parametrize("call", ["mkdir", "open"])
def test_creating_the_output_fails(tmp_path, monkeypatch, capsys, command, call, error, code):
    """EROFS/EACCES/... injected where the temporary is created (os.mkdir for directories,
    os.open with O_CREAT for files): a read-only or denied directory, as root cannot make one."""
    out = tmp_path / "out"
    args = WRITERS[command](out)
    _fail_creating(monkeypatch, call, error)
    status, _, err = run_in_process(capsys, *args)
    monkeypatch.undo()
    if status == 0:  # this command creates nothing this way (a file written by Python's open)
        assert (call, command) in CREATES_NOTHING_BY, (call, command)
        return
    assert_one_line_error(status, err, os.strerror(error), "nothing was written")
    only(tmp_path)
    _check_code(args, out, command, call, error, code, monkeypatch)


# export creates its one file with os.open (mkstemp), never os.mkdir (its directory exists).
CREATES_NOTHING_BY = {("mkdir", "export")}


def _fail_creating(monkeypatch, call: str, error: int) -> None:
    """os.mkdir, or os.open with O_CREAT, fails with `error` (reading inputs goes on)."""
    real = getattr(os, call)

    def failing(path, *rest, **kw):
        if call == "open" and not (rest[0] if rest else kw.get("flags", 0)) & os.O_CREAT:
            return real(path, *rest, **kw)
        raise OSError(error, os.strerror(error), os.fspath(path))

    monkeypatch.setattr(os, call, failing)


def _check_code(args, out, command, call, error, code, monkeypatch) -> None:
    """The same failure through the library carries its code."""
    from loratools.cli import main

    _fail_creating(monkeypatch, call, error)
    try:
        with pytest.raises(LoraToolsError) as caught:
            main(["--debug", *map(str, args)], prog_name="loratools", standalone_mode=False)
    finally:
        monkeypatch.undo()
    assert caught.value.code == code, caught.value


@pytest.mark.parametrize("command", ["convert", "resize", "combine", "extract", "merge"])
def test_a_full_disk_while_writing(tmp_path, monkeypatch, capsys, command):
    """ENOSPC injected at os.write after the first bytes (every write of these commands goes
    through it, in forked merge workers too)."""
    out = tmp_path / "out"
    real = os.write
    state = {"calls": 0}

    def write(fd, data):
        state["calls"] += 1
        if state["calls"] > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    status, _, err = run_in_process(capsys, *WRITERS[command](out))
    monkeypatch.undo()
    assert_one_line_error(status, err, "No space left on device", "nothing was written")
    only(tmp_path)


@pytest.mark.parametrize("command", ["convert", "resize", "combine", "extract", "merge", "merge-sharded"])
def test_short_writes_are_completed(tmp_path, monkeypatch, capsys, command):
    """os.write taking at most 7 bytes at a time: the output is complete all the same."""
    out = tmp_path / "out"
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, memoryview(data).cast("B")[:7]))
    status, _, err = run_in_process(capsys, *WRITERS[command](out))
    monkeypatch.undo()
    assert status == 0, err
    reference = tmp_path / "reference"
    assert run_cli(*WRITERS[command](reference)).returncode == 0
    for path in sorted(reference.rglob("*")) if reference.is_dir() else [reference]:
        mirror = out / path.relative_to(reference) if reference.is_dir() else out
        assert mirror.read_bytes() == path.read_bytes(), path.name


def test_a_write_that_takes_nothing_is_an_error_not_a_loop(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    status, _, err = run_in_process(capsys, "convert", ADAPTERS / "llama-basic", out, "--to-lora")
    monkeypatch.undo()
    assert_one_line_error(status, err, "the disk took no bytes of a write", "nothing was written")
    only(tmp_path)


def _fd_name(fd: int) -> str:
    return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))


def _fail_at_file(patch, name: str, occurrence: int, stage: str, fault: str) -> dict[str, bool]:
    """The `occurrence`-th file named `name` an output creates fails: when it is created (os.open
    with O_CREAT) or when it is written (os.write; "short": half of the first write taken, then
    ENOSPC). Returns a flag that says whether the fault was reached."""
    errnum = {"ENOSPC": errno.ENOSPC, "EROFS": errno.EROFS, "short": errno.ENOSPC}[fault]
    real_open, real_write = os.open, os.write
    state = {"opened": 0, "fired": False, "short": False}

    def open_(path, flags, *rest, **kw):
        if flags & os.O_CREAT and os.path.basename(os.fspath(path)) == name:
            state["opened"] += 1
            if state["opened"] == occurrence and stage == "create":
                state["fired"] = True
                raise OSError(errnum, os.strerror(errnum), os.fspath(path))
        return real_open(path, flags, *rest, **kw)

    def write(fd, data):  # a shard is created here and written through a descriptor of its own
        if stage == "write" and state["opened"] == occurrence and _fd_name(fd) == name:
            state["fired"] = True
            view = memoryview(data).cast("B")
            if fault == "short" and not state["short"] and view.nbytes > 1:
                state["short"] = True
                return real_write(fd, view[: view.nbytes // 2])
            raise OSError(errnum, os.strerror(errnum))
        return real_write(fd, data)

    patch.setattr(os, "open", open_)
    patch.setattr(os, "write", write)
    return state


# config.json is created twice in OUT: copied from BASE, then rewritten with the new dtype.
MERGE_FILES = [("model.safetensors.index.json", 1), ("config.json", 2), ("model-00002-of-00004.safetensors", 1)]


@pytest.mark.parametrize("name, occurrence", MERGE_FILES, ids=[n for n, _ in MERGE_FILES])
@pytest.mark.parametrize("stage, fault, code", [("create", "EROFS", "read-only"), ("create", "ENOSPC", "no-space"),
                                                ("write", "ENOSPC", "no-space"), ("write", "EROFS", "read-only"),
                                                ("write", "short", "no-space")])
def test_merge_index_config_and_shards_fail_as_one_line(tmp_path, capsys, name, occurrence, stage, fault, code):
    """merge's index, its rewritten config.json and its shards are created and written through the
    checked writer (formats/atomic.py) like every other output file: a failure there is one line
    with its code, and no OUT and no temporary are left."""
    from loratools.cli import main

    out = tmp_path / "out"
    args = WRITERS["merge-sharded"](out)
    with pytest.MonkeyPatch.context() as patch:
        reached = _fail_at_file(patch, name, occurrence, stage, fault)
        status, _, err = run_in_process(capsys, *args)
    assert reached["fired"], f"the fault at {stage} of {name} (#{occurrence}) was never reached"
    assert_one_line_error(status, err, os.strerror(errno.EROFS if fault == "EROFS" else errno.ENOSPC), "nothing was written")
    only(tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        _fail_at_file(patch, name, occurrence, stage, fault)
        with pytest.raises(LoraToolsError) as caught:
            main(["--debug", *map(str, args)], prog_name="loratools", standalone_mode=False)
    assert caught.value.code == code, caught.value
    only(tmp_path)


# ---- 3. extract: nothing changed, integer weights --------------------------------------------------


def test_extract_of_a_base_from_itself_is_refused(tmp_path):
    out = tmp_path / "out"
    result = run_cli("extract", BASES / "llama", BASES / "llama", out, "--rank", "2")
    assert_clean_error(result, "every tensor equals BASE's; there is no difference to extract", code=1)
    assert_nothing_written(out)


@pytest.mark.parametrize("side", ["BASE", "FINETUNED"])
def test_extract_refuses_an_integer_weight(tmp_path, side):
    key = "model.layers.0.self_attn.q_proj.weight"
    changed = base_with(tmp_path, "int8", key, 0.0)
    tensors = load_file(str(changed / "model.safetensors"))
    tensors[key] = np.clip(np.round(tensors[key] * 100), -127, 127).astype(np.int8)
    save_file(tensors, str(changed / "model.safetensors"), metadata={"format": "pt"})
    base, tuned = (changed, BASES / "llama") if side == "BASE" else (BASES / "llama", changed)
    out = tmp_path / "out"
    result = run_cli("extract", base, tuned, out, "--rank", "2")
    assert_clean_error(result, f"{key}: a {side} I8 weight of module model.layers.0.self_attn.q_proj",
                       "float weights only", code=1)
    assert_nothing_written(out)


# ---- 6. merge copies only regular files, exactly their size -----------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_base_file_swapped_for_a_special_file_before_it_is_copied(tmp_path, monkeypatch, capsys, kind):
    """tokenizer.json is a regular file when BASE is opened, a FIFO or /dev/zero when merge copies
    it into OUT: not-a-file, nothing written (before, shutil's copy blocked, ran for ever or failed
    with SpecialFileError)."""
    from loratools.ops.merge import run as merge

    base = tmp_path / "base"
    shutil.copytree(BASES / "llama", base)
    (base / "tokenizer.json").write_text("{}")
    real = merge._write_shards

    def swap_then_write(*args, **kwargs):
        (base / "tokenizer.json").unlink()
        if kind == "fifo":
            os.mkfifo(base / "tokenizer.json")
        else:
            (base / "tokenizer.json").symlink_to("/dev/zero")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge, "_write_shards", swap_then_write)
    out = tmp_path / "out"
    code, _, err = run_in_process(capsys, "merge", base, ADAPTERS / "llama-basic", out)
    assert_one_line_error(code, err, "tokenizer.json: is a", "not a regular file")
    only(tmp_path, "base")


def test_a_base_file_linked_to_a_regular_file_is_copied_whole(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASES / "llama", base)
    (tmp_path / "tok.json").write_bytes(b"x" * 100_000)
    (base / "tokenizer.json").symlink_to(tmp_path / "tok.json")
    result = run_cli("merge", base, ADAPTERS / "llama-basic", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    copied = tmp_path / "out" / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_bytes() == b"x" * 100_000


# ---- 7. --initial with NaN: non-finite before the checks' linear algebra ----------------------------


@pytest.fixture(scope="module")
def pissa(tmp_path_factory):
    from tests.test_initial import train_and_convert

    base, trained, initial, _ = train_and_convert(tmp_path_factory.mktemp("pissa"), "pissa")
    return base, trained, initial


def test_initial_with_nan_is_refused_as_non_finite(pissa, tmp_path):
    base, trained, initial = pissa
    bad = tmp_path / "initial"
    shutil.copytree(initial, bad)
    set_first = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors = load_file(str(bad / WEIGHTS))
    tensors[set_first] = tensors[set_first].copy()
    tensors[set_first].flat[0] = np.nan
    save_file(tensors, str(bad / WEIGHTS), metadata={"format": "pt"})
    for args in (["merge", base, trained, tmp_path / "out", "--initial", bad],
                 ["convert", trained, tmp_path / "out", "--to-lora", "--initial", bad]):
        result = run_cli(*args)
        assert_clean_error(result, "module model.layers.0.self_attn.q_proj: NaN or Inf in the --initial adapter's factors",
                           code=1)
        assert "LinAlgError" not in result.stderr
        assert_nothing_written(tmp_path / "out")


def test_initial_on_a_base_with_nan_is_refused_as_non_finite(pissa, tmp_path):
    base, trained, initial = pissa
    bad = tmp_path / "base"
    shutil.copytree(base, bad)
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors = load_file(str(bad / "model.safetensors"))
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] = np.nan
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    result = run_cli("merge", bad, trained, tmp_path / "out", "--initial", initial)
    assert_clean_error(result, f"module model.layers.0.self_attn.q_proj: NaN or Inf in base {key}", code=1)
    assert_nothing_written(tmp_path / "out")


# ---- 8. property: any write, open or rename failing at any call ----------------------------------


def _tree(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


_REFERENCES: dict[str, dict[str, bytes]] = {}


def _reference(command: str, capsys) -> dict[str, bytes]:
    """What the command writes when nothing fails (once per command)."""
    import tempfile

    if command not in _REFERENCES:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            status, _, err = run_in_process(capsys, *WRITERS[command](out))
            assert status == 0, err
            _REFERENCES[command] = _tree(_out_name(out, command))
    return _REFERENCES[command]


def _inject(patch, call: str, fault: str, index: int, json_only: bool = False) -> None:
    """Make the `index`-th call of `call` (os.write, os.open creating a file, or the final
    rename) fail with `fault`: an errno, or "short" (half the bytes, then ENOSPC on the next).
    json_only: count only the calls on .json files (adapter_config.json, merge's index and
    config.json), which come after the tensors and a small `index` would not reach."""
    from loratools.formats import atomic

    count = {"n": 0}
    errnum = {"ENOSPC": errno.ENOSPC, "EROFS": errno.EROFS, "ENAMETOOLONG": errno.ENAMETOOLONG, "short": errno.ENOSPC}[fault]

    def due() -> bool:
        count["n"] += 1
        return count["n"] >= index if fault == "short" else count["n"] == index

    if call == "write":
        real_write = os.write

        def write(fd, data):
            if json_only and not _fd_name(fd).endswith(".json") or not due():
                return real_write(fd, data)
            view = memoryview(data).cast("B")
            if fault == "short" and count["n"] == index and view.nbytes > 1:
                return real_write(fd, view[: view.nbytes // 2])
            raise OSError(errnum, os.strerror(errnum))

        patch.setattr(os, "write", write)
    elif call == "open":
        real_open = os.open

        def open_(path, flags, *rest, **kw):
            counted = not json_only or os.fspath(path).endswith(".json")
            if flags & os.O_CREAT and counted and due():
                raise OSError(errnum, os.strerror(errnum), os.fspath(path))
            return real_open(path, flags, *rest, **kw)

        patch.setattr(os, "open", open_)
    else:
        real_rename = atomic._renameat2

        def rename(src, dst, flags):
            if due():
                raise OSError(errnum, os.strerror(errnum), os.fspath(dst))
            return real_rename(src, dst, flags)

        patch.setattr(atomic, "_renameat2", rename)


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


# capsys is shared by the examples on purpose: run_in_process reads it empty before each run.
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(sorted(WRITERS)), call=st.sampled_from(["write", "open", "rename"]),
       fault=st.sampled_from(["short", "ENOSPC", "EROFS", "ENAMETOOLONG"]), index=st.integers(1, 6))
def test_any_write_failing_leaves_nothing_or_a_complete_output(capsys, command, call, fault, index):
    _run_with_fault(capsys, command, call, fault, index)


# merge of a sharded base with --dtype creates 4 JSON files (the index, config.json and
# generation_config.json copied, config.json rewritten), after the shards: indexes 1-4 reach each.
@settings(max_examples=24, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["merge-sharded", "convert"]), call=st.sampled_from(["write", "open"]),
       fault=st.sampled_from(["short", "ENOSPC", "EROFS", "ENAMETOOLONG"]), index=st.integers(1, 4))
def test_a_json_write_failing_leaves_nothing_or_a_complete_output(capsys, command, call, fault, index):
    _run_with_fault(capsys, command, call, fault, index, json_only=True)


def _run_with_fault(capsys, command: str, call: str, fault: str, index: int, json_only: bool = False) -> None:
    """The command with one fault injected (_inject): it exits 0 with the output it writes when
    nothing fails, or fails in one line leaving nothing."""
    import tempfile

    expected = _reference(command, capsys)
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        root = Path(tmp)
        out = root / "out"
        _inject(patch, call, fault, index, json_only)
        status, _, err = run_in_process(capsys, *WRITERS[command](out))
        patch.undo()
        if status == 0:
            assert _tree(_out_name(out, command)) == expected
            only(root, _out_name(out, command).name)
        else:
            assert_one_line_error(status, err)
            only(root)


# ---- 5. FP8 bases: NaN block scales, orphan scales ------------------------------------------------


@pytest.fixture(scope="module")
def fp8_base(tmp_path_factory):
    """A tiny block-scaled FP8 LLaMA and a LoRA adapter on its q_proj."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tests.quantized_models import save_bf16, save_fp8, tiny_causal_lm

    root = tmp_path_factory.mktemp("fp8")
    base8 = save_fp8(save_bf16("llama", root / "b16"), root / "b8", block=[32, 32])
    torch.manual_seed(5)
    model = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(root / "adapter")
    return base8, root / "adapter"


def _edited_base(base: Path, root: Path, edit) -> Path:
    from safetensors.torch import load_file as load_torch, save_file as save_torch

    out = root / "base"
    shutil.copytree(base, out)
    tensors = load_torch(str(out / "model.safetensors"))
    edit(tensors)
    save_torch(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("weight", ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"])
def test_a_nan_block_scale_fails_validate_base_as_merge(fp8_base, tmp_path, weight):
    """Under the adapter or not: merge refuses it, so validate --base reports it in the same line."""
    base8, adapter = fp8_base

    def nan_scale(tensors):
        key = weight + "_scale_inv"
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[1] = float("nan")

    base = _edited_base(base8, tmp_path, nan_scale)
    fragment = f"{weight}_scale_inv: a block scale is NaN or Inf"
    assert_clean_error(run_cli("validate", adapter, "--base", base), fragment, code=1)
    assert_clean_error(run_cli("merge", base, adapter, tmp_path / "out"), fragment, code=1)
    assert_nothing_written(tmp_path / "out")
    assert run_cli("validate", adapter, "--base", base8).returncode == 0


def test_an_orphan_block_scale_is_not_copied(fp8_base, tmp_path):
    """A weight_scale_inv without its weight is refused (quant-state), never copied into OUT."""
    import torch

    base8, adapter = fp8_base
    base = _edited_base(base8, tmp_path, lambda t: t.update({"model.layers.1.mlp.extra.weight_scale_inv": torch.ones(2, 2)}))
    fragment = "model.layers.1.mlp.extra.weight_scale_inv: a block scale without its weight"
    assert_clean_error(run_cli("validate", adapter, "--base", base), fragment, code=1)
    assert_clean_error(run_cli("merge", base, adapter, tmp_path / "out"), fragment, code=1)
    assert_nothing_written(tmp_path / "out")
