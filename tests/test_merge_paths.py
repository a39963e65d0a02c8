"""The fast paths of merge give the same files as the general one: worker processes, the
torch-free numpy kernel, memory-mapped reads of tensors at any offset; and a worker that dies
is a clean error."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loratools
from tests.conftest import ADAPTERS, BASES, assert_clean_error, run_cli
from tests.merged import digest, merged_tensors
from tests.tiny_models import build_base


def test_workers_write_the_same_bytes(tmp_path):
    reports = {}
    for workers in (1, 2, 4, 9):
        reports[workers] = loratools.merge(BASES / "llama-sharded", ADAPTERS / "llama-basic", tmp_path / str(workers), workers=workers)
    digests = {w: digest(tmp_path / str(w)) for w in reports}
    assert all(d == digests[1] for d in digests.values())
    assert {w: r.workers for w, r in reports.items()} == {1: 1, 2: 2, 4: 4, 9: 4}  # at most one per shard
    result = run_cli("merge", BASES / "llama-sharded", ADAPTERS / "llama-basic", tmp_path / "cli", "--workers", "3", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["workers"] == 3 and digest(tmp_path / "cli") == digests[1]
    assert_clean_error(run_cli("merge", BASES / "llama", ADAPTERS / "llama-basic", tmp_path / "o", "--workers", "0"), "--workers", code=2)


def _without_numpy_kernel(monkeypatch):
    """Plans that give every computed tensor to the torch kernel."""
    from loratools.ops.merge import plan

    monkeypatch.setattr(plan, "kernel_for", lambda *args: "torch")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name,family", [("llama-basic", "llama"), ("gpt2-conv1d", "gpt2"), ("llama-embedding", "llama")])
def test_numpy_kernel_equals_the_torch_path(tmp_path, monkeypatch, dtype, name, family):
    """Plain LoRA on CPU is merged without torch; it must agree with the torch arithmetic (which
    the other tests hold against PEFT), to the last bit but for a few float32 ties."""
    base = tmp_path / "base"
    build_base(family).to(dtype).save_pretrained(str(base))
    loratools.merge(base, ADAPTERS / name, tmp_path / "numpy")
    _without_numpy_kernel(monkeypatch)
    loratools.merge(base, ADAPTERS / name, tmp_path / "torch")
    ours, reference = merged_tensors(tmp_path / "numpy"), merged_tensors(tmp_path / "torch")
    assert ours.keys() == reference.keys()
    changed = 0
    for key in ours:
        assert ours[key].dtype == dtype
        torch.testing.assert_close(ours[key], reference[key], rtol=2e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-5)
        assert (ours[key] == reference[key]).float().mean() > 0.99, key
        changed += not torch.equal(ours[key], merged_tensors(base)[key])
    assert changed >= 2  # the adapter did change something


def test_numpy_kernel_output_dtypes(tmp_path, monkeypatch):
    """--dtype through the numpy kernel (float32 base rounded to bf16/f16) equals the torch path's rounding."""
    for dtype in ("bfloat16", "float16"):
        loratools.merge(BASES / "llama", ADAPTERS / "llama-basic", tmp_path / f"np-{dtype}", dtype=dtype)
    _without_numpy_kernel(monkeypatch)
    for dtype in ("bfloat16", "float16"):
        loratools.merge(BASES / "llama", ADAPTERS / "llama-basic", tmp_path / f"t-{dtype}", dtype=dtype)
        ours, reference = merged_tensors(tmp_path / f"np-{dtype}"), merged_tensors(tmp_path / f"t-{dtype}")
        for key in ours:
            assert (ours[key] == reference[key]).float().mean() > 0.99, key


@pytest.mark.parametrize("dtype,value,out_dtype", [
    (torch.bfloat16, float("nan"), None),
    (torch.float32, float("nan"), None),
    (torch.float32, float("inf"), "float16"),
    (torch.float32, 3.4e38, "bfloat16"),  # finite in float32, rounds to Inf in bfloat16
    (torch.float32, 70000.0, "float16"),  # beyond float16's 65504
])
def test_numpy_kernel_refuses_non_finite_results(tmp_path, dtype, value, out_dtype):
    """A NaN/Inf in a base weight, or a value the output dtype cannot hold: refused, nothing
    written (float16 overflow from a large alpha: test_real_world)."""
    model = build_base("llama").to(dtype)
    path = next(iter(loratools.load_adapter(ADAPTERS / "llama-basic").modules))
    with torch.no_grad():
        dict(model.named_parameters())[f"{path}.weight"][0, 0] = value
    model.save_pretrained(str(tmp_path / "base"))
    extra = ["--dtype", out_dtype] if out_dtype else []
    assert_clean_error(run_cli("merge", tmp_path / "base", ADAPTERS / "llama-basic", tmp_path / "o", *extra), f"merged {path}.weight is not finite")
    assert not (tmp_path / "o").exists()


NO_TORCH = textwrap.dedent("""
    import sys
    from loratools.cli import main
    sys.argv = ["loratools", "merge", *sys.argv[1:]]
    try:
        main()
    except SystemExit as exc:
        assert not exc.code, exc.code
    print("torch imported" if "torch" in sys.modules else "no torch")
""")


@pytest.mark.parametrize("adapter,imports_torch", [("llama-basic", False), ("gpt2-conv1d", False), ("llama-dora", True)])
def test_plain_lora_is_merged_without_importing_torch(tmp_path, adapter, imports_torch):
    base = BASES / ("gpt2" if adapter.startswith("gpt2") else "llama-sharded")
    result = subprocess.run([sys.executable, "-c", NO_TORCH, str(base), str(ADAPTERS / adapter), str(tmp_path / "out"), "--quiet", "--device", "auto"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("torch imported" if imports_torch else "no torch")


def _unaligned_copy(src, dst) -> None:
    """The same tensors with a 3-byte tensor first, so every later tensor starts at an odd
    offset (legal safetensors; the reference writer happens to align, others need not)."""
    tensors = load_file(str(src))
    entries = [("aaa.odd", "U8", (3,))] + [(k, {torch.float32: "F32", torch.bfloat16: "BF16"}[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    from loratools.formats.safetensors_writer import encode_header

    blob, _ = encode_header(entries, {"format": "pt"})
    with open(dst, "wb") as fh:
        fh.write(blob + b"\x01\x02\x03")
        for name, _, _ in entries[1:]:
            fh.write(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())


@pytest.mark.parametrize("numpy_kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensors_at_unaligned_offsets(tmp_path, monkeypatch, numpy_kernel, dtype):
    aligned = tmp_path / "aligned.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(str(BASES / "llama" / "model.safetensors")).items()}, str(aligned))
    odd = tmp_path / "odd.safetensors"
    _unaligned_copy(aligned, odd)
    if not numpy_kernel:
        _without_numpy_kernel(monkeypatch)
    loratools.merge(aligned, ADAPTERS / "llama-basic", tmp_path / "a.safetensors")
    loratools.merge(odd, ADAPTERS / "llama-basic", tmp_path / "b.safetensors")
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert b.pop("aaa.odd").tolist() == [1, 2, 3]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


WORKER_DIES = textwrap.dedent("""
    import os, signal, sys
    from loratools.ops.merge import shard as merge_shard
    sig = getattr(signal, sys.argv.pop())
    def dies(*args, **kwargs):
        os.kill(os.getpid(), sig)
    merge_shard.write_shard = dies
    from loratools.cli import main
    sys.argv = ["loratools", "merge", *sys.argv[1:]]
    main()
""")


@pytest.mark.parametrize("sig,message", [("SIGBUS", "changed on disk while it was being read"), ("SIGKILL", "was killed")])
def test_a_worker_that_dies_is_a_clean_error(tmp_path, sig, message):
    """A base truncated under a worker's memory map kills it with SIGBUS; the OOM killer uses
    SIGKILL. Either way: one line, non-zero, nothing written."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", WORKER_DIES, str(BASES / "llama-sharded"), str(ADAPTERS / "llama-basic"), str(out), sig],
                            capture_output=True, text=True, timeout=300)
    assert_clean_error(result, message, "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_padded_header_and_trailing_metadata_preserved(tmp_path):
    """The output header keeps the base's __metadata__ and starts data 8-byte aligned."""
    loratools.merge(BASES / "llama-sharded", ADAPTERS / "llama-basic", tmp_path / "out", workers=2)
    for shard in (tmp_path / "out").glob("*.safetensors"):
        raw = shard.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8: 8 + n])
        with safe_open(str(BASES / "llama-sharded" / shard.name), "pt") as original:
            assert n % 8 == 0 and header["__metadata__"] == original.metadata()
        assert max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__") == len(raw) - 8 - n


def test_a_disk_without_room_fails_before_any_work(tmp_path, monkeypatch):
    """The output's size is reserved first (fallocate): ENOSPC there is one clear error."""
    import errno

    from loratools.formats import atomic
    from loratools.errors import LoraToolsError

    monkeypatch.setattr(atomic, "_fallocate", lambda fd, size: errno.ENOSPC)
    with pytest.raises(LoraToolsError, match="not enough disk space") as caught:
        loratools.merge(BASES / "llama-sharded", ADAPTERS / "llama-basic", tmp_path / "out")
    assert caught.value.code == "no-space" and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(atomic, "_fallocate", lambda fd, size: errno.EOPNOTSUPP)  # no fallocate: written anyway
    loratools.merge(BASES / "llama-sharded", ADAPTERS / "llama-basic", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_device_staging_ring_on_cpu(tmp_path, monkeypatch):
    """The GPU pipeline's host side (two staging buffers reused in turn) run on CPU: same bytes
    as the direct path. (The device side is tested where CUDA exists: test_cuda_merge_equals_cpu_merge.)"""
    from loratools.ops.merge import kernel_torch as merge_torch

    _without_numpy_kernel(monkeypatch)
    loratools.merge(BASES / "llama-sharded", ADAPTERS / "llama-dora", tmp_path / "direct", workers=1)
    real_init = merge_torch.DeviceState.__init__

    def with_stager(self, dev):
        real_init(self, dev)
        self.stager = merge_torch.DeviceStager(dev)

    monkeypatch.setattr(merge_torch.DeviceState, "__init__", with_stager)
    loratools.merge(BASES / "llama-sharded", ADAPTERS / "llama-dora", tmp_path / "staged", workers=1)
    assert digest(tmp_path / "staged") == digest(tmp_path / "direct")
    # the ring itself: buffers alternate, and each is reused two tensors later
    stager = merge_torch.DeviceStager(torch.device("cpu"))
    first, second = torch.arange(6.0).view(2, 3), torch.ones(4)
    a, b = stager.to_device(first), stager.to_device(second)
    assert torch.equal(a, first) and torch.equal(b, second) and a.data_ptr() != b.data_ptr()
    assert stager.to_device(first * 2).data_ptr() == a.data_ptr()  # the first buffer, reused in turn
