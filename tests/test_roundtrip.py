"""PEFT-made adapter -> loratools read -> write -> PEFT loads it: same tensors, same outputs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import loratools
from tests.conftest import ADAPTERS
from tests.peft_ref import outputs, peft_model, sample_inputs
from tests.tiny_models import build_base


def _peft_tensors(adapter_dir):
    if (adapter_dir / "adapter_model.safetensors").exists():
        return load_file(str(adapter_dir / "adapter_model.safetensors"))
    return torch.load(str(adapter_dir / "adapter_model.bin"), weights_only=True)


def test_round_trip_through_peft(fixture_adapter, tmp_path):
    name, adapter_dir, base = fixture_adapter
    out = tmp_path / "out"
    adapter = loratools.load_adapter(adapter_dir)
    loratools.save_adapter(adapter, out)

    original, written = _peft_tensors(adapter_dir), load_file(str(out / "adapter_model.safetensors"))
    assert original.keys() == written.keys()
    for key in original:
        assert original[key].dtype == written[key].dtype
        assert torch.equal(original[key], written[key]), key
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((adapter_dir / "adapter_config.json").read_text())

    reference = outputs(peft_model(base, adapter_dir), base)
    ours = outputs(peft_model(base, out), base)
    assert torch.equal(reference, ours)
    # And the adapter is not a no-op: its outputs differ from the bare base model's.
    with torch.no_grad():
        bare = build_base(base)(**sample_inputs(base)).logits
    assert not torch.allclose(bare, reference)


def test_round_trip_is_byte_identical(tmp_path):
    adapter = loratools.load_adapter(ADAPTERS / "llama-rslora-patterns")
    loratools.save_adapter(adapter, tmp_path / "a")
    loratools.save_adapter(loratools.load_adapter(tmp_path / "a"), tmp_path / "b")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_legacy_bin_is_rewritten_as_safetensors(tmp_path):
    loratools.save_adapter(loratools.load_adapter(ADAPTERS / "llama-legacy-bin"), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_existing_output_needs_force(tmp_path):
    adapter = loratools.load_adapter(ADAPTERS / "llama-basic")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(loratools.LoraToolsError, match="already exists"):
        loratools.save_adapter(adapter, out)
    assert (out / "keep.txt").read_text() == "mine"
    loratools.save_adapter(adapter, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary siblings left over


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import errno

    adapter = loratools.load_adapter(ADAPTERS / "llama-basic")

    def boom(*args, **kwargs):  # every byte of an adapter is written by os.write (formats/atomic.py)
        raise OSError(errno.ENOSPC, "disk full")

    monkeypatch.setattr(os, "write", boom)
    with pytest.raises(OSError):
        loratools.save_adapter(adapter, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_opening_reads_no_tensor(monkeypatch):
    """Opening is O(number of tensors): only the header is parsed, no tensor is loaded."""
    from loratools.formats import tensors

    def no_load(self, key):
        raise AssertionError(f"tensor {key} loaded while opening")

    monkeypatch.setattr(tensors.SafetensorsStore, "get", no_load)
    adapter = loratools.load_adapter(ADAPTERS / "llama-dora")
    assert len(adapter.modules) == 6


def test_adapter_file_path_is_accepted():
    adapter = loratools.load_adapter(ADAPTERS / "gpt2-conv1d" / "adapter_model.safetensors")
    assert adapter.architecture == "gpt2" and len(adapter.modules) == 8
