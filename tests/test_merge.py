"""`loratools merge` against PEFT's merge_and_unload on the same files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import loratools
from loratools.ops import merge as merge_mod
from loratools.ops.merge import shard as merge_shard
from tests.broken import edit_config
from tests.conftest import ADAPTERS, BASES, assert_clean_error, run_cli
from tests.merged import assert_matches_peft, digest, merged_tensors
from tests.peft_ref import load_base, outputs, peft_merged_state_dict, peft_model
from tests.tiny_models import build_base, save_llama_variant


@pytest.mark.parametrize("sharded", [False, True])
def test_merge_equals_peft(fixture_adapter, tmp_path, sharded):
    name, adapter_dir, family = fixture_adapter
    base_dir = BASES / ("llama-sharded" if sharded and family == "llama" else family)
    out = tmp_path / "merged"
    result = run_cli("merge", base_dir, adapter_dir, out)
    assert result.returncode == 0, result.stderr
    reference = peft_merged_state_dict(family, base_dir, adapter_dir)
    ours = merged_tensors(out)
    assert_matches_peft(ours, reference)
    # Every tensor PEFT's merged model has is in OUT (tied lm_head stored once, as in the base).
    base_names = set(merged_tensors(base_dir))
    assert set(ours) == base_names
    # transformers loads OUT and computes what the (unmerged) PEFT model computes.
    merged_model = load_base(family, out)
    torch.testing.assert_close(outputs(merged_model, family), outputs(peft_model(family, adapter_dir), family), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,family", [("llama-basic", "llama"), ("gpt2-conv1d", "gpt2"), ("llama-dora", "llama"), ("llama-embedding", "llama"), ("gpt2-lora-bias", "gpt2")])
def test_half_precision_bases(tmp_path, dtype, name, family):
    base_dir = tmp_path / "base"
    build_base(family).to(dtype).save_pretrained(str(base_dir))
    out = tmp_path / "merged"
    loratools.merge(base_dir, ADAPTERS / name, out)
    ours = merged_tensors(out)
    assert all(t.dtype == dtype for t in ours.values())
    assert_matches_peft(ours, peft_merged_state_dict(family, base_dir, ADAPTERS / name, dtype), merged_tensors(base_dir))


def test_rounded_once_from_float32(tmp_path):
    """bf16 base: the result is round(W + ΔW) with ΔW and the sum in float32."""
    base_dir = tmp_path / "base"
    build_base("llama").to(torch.bfloat16).save_pretrained(str(base_dir))
    loratools.merge(base_dir, ADAPTERS / "llama-basic", tmp_path / "out")
    adapter = loratools.load_adapter(ADAPTERS / "llama-basic")
    base = load_file(str(base_dir / "model.safetensors"))
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for path in adapter.modules:
        expected = (base[f"{path}.weight"].float() + adapter.delta(path)).to(torch.bfloat16)
        # addmm may associate differently from (B@A)*s: allow a few ties to round the other way
        assert (merged[f"{path}.weight"] == expected).float().mean() > 0.99


def test_conv1d_orientation_comes_from_the_architecture(tmp_path):
    """GPT-2's attn.c_proj is square: only the architecture says it is Conv1D. The fan_in_fan_out
    flag is not trusted either."""
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTERS / "gpt2-conv1d", adapter)
    edit_config(adapter, lambda c: {**c, "fan_in_fan_out": False})
    loratools.merge(BASES / "gpt2", adapter, tmp_path / "out")
    ours = merged_tensors(tmp_path / "out")
    reference = peft_merged_state_dict("gpt2", BASES / "gpt2", ADAPTERS / "gpt2-conv1d")
    assert_matches_peft(ours, reference)
    name = "transformer.h.0.attn.c_proj.weight"
    a = loratools.load_adapter(adapter)
    wrong = load_file(str(BASES / "gpt2" / "model.safetensors"))[name] + a.delta("transformer.h.0.attn.c_proj").T
    assert not torch.allclose(ours[name], wrong)


def test_tied_embedding_lora_stays_consistent(tmp_path):
    """GPT-2 ties lm_head to wte and stores it once: a LoRA on wte changes both, in one tensor."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(build_base("gpt2"), LoraConfig(r=2, lora_alpha=4, target_modules=["wte", "c_attn"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "adapter"))
    loratools.merge(BASES / "gpt2", tmp_path / "adapter", tmp_path / "out")
    ours = merged_tensors(tmp_path / "out")
    assert "lm_head.weight" not in ours
    reference = peft_merged_state_dict("gpt2", BASES / "gpt2", tmp_path / "adapter")
    assert_matches_peft(ours, reference)
    reloaded = load_base("gpt2", tmp_path / "out")
    assert torch.equal(reloaded.lm_head.weight, reloaded.transformer.wte.weight)
    torch.testing.assert_close(reloaded.lm_head.weight, reference["lm_head.weight"], rtol=1e-6, atol=1e-6)


def test_scale_minus_one_undoes_a_merge(tmp_path):
    run = lambda *a: run_cli("merge", *a)  # noqa: E731
    assert run(BASES / "llama", ADAPTERS / "llama-rslora-patterns", tmp_path / "m").returncode == 0
    assert run(tmp_path / "m", ADAPTERS / "llama-rslora-patterns", tmp_path / "u", "--scale", "-1").returncode == 0
    base, undone = merged_tensors(BASES / "llama"), merged_tensors(tmp_path / "u")
    for name in base:
        torch.testing.assert_close(undone[name], base[name], rtol=0, atol=1e-5)
    twice = tmp_path / "twice"
    assert run(BASES / "llama", ADAPTERS / "llama-rslora-patterns", twice, "--scale", "2").returncode == 0
    once, two = merged_tensors(tmp_path / "m"), merged_tensors(twice)
    for name in base:
        torch.testing.assert_close(two[name] - base[name], 2 * (once[name] - base[name]), rtol=1e-5, atol=1e-6)


def test_scale_is_refused_where_it_has_no_meaning(tmp_path):
    assert_clean_error(run_cli("merge", BASES / "llama", ADAPTERS / "llama-dora", tmp_path / "o", "--scale", "-1"), "DoRA")
    assert_clean_error(run_cli("merge", BASES / "bert", ADAPTERS / "bert-modules-to-save", tmp_path / "o", "--scale", "0.5"), "modules_to_save")
    assert not (tmp_path / "o").exists()


def test_output_dtype(tmp_path):
    out = tmp_path / "out"
    assert run_cli("merge", BASES / "llama", ADAPTERS / "llama-basic", out, "--dtype", "bfloat16").returncode == 0
    fp32 = tmp_path / "fp32"
    loratools.merge(BASES / "llama", ADAPTERS / "llama-basic", fp32)
    ours, full = merged_tensors(out), merged_tensors(fp32)
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    for name in full:
        assert torch.equal(ours[name], full[name].to(torch.bfloat16)), name
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert load_base("llama", out).dtype == torch.bfloat16


def test_out_mirrors_a_sharded_base(tmp_path):
    out = tmp_path / "out"
    loratools.merge(BASES / "llama-sharded", ADAPTERS / "llama-basic", out)
    base = BASES / "llama-sharded"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    for name in ("config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    ours_index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert ours_index["weight_map"] == base_index["weight_map"]
    assert ours_index["metadata"]["total_size"] == base_index["metadata"]["total_size"]
    for shard in set(base_index["weight_map"].values()):
        assert set(load_file(str(out / shard))) == set(load_file(str(base / shard)))
    single = tmp_path / "single"
    loratools.merge(BASES / "llama", ADAPTERS / "llama-basic", single)
    a, b = merged_tensors(out), merged_tensors(single)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_single_file_base_gives_a_single_file(tmp_path):
    out = tmp_path / "merged.safetensors"
    result = run_cli("merge", BASES / "gpt2" / "model.safetensors", ADAPTERS / "gpt2-conv1d", out)
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    reference = peft_merged_state_dict("gpt2", BASES / "gpt2", ADAPTERS / "gpt2-conv1d")
    assert_matches_peft(load_file(str(out)), reference)


def test_inputs_untouched_and_output_reproducible(tmp_path):
    before = digest(BASES / "llama-sharded"), digest(ADAPTERS / "llama-dora")
    loratools.merge(BASES / "llama-sharded", ADAPTERS / "llama-dora", tmp_path / "a")
    loratools.merge(BASES / "llama-sharded", ADAPTERS / "llama-dora", tmp_path / "b")
    assert (digest(BASES / "llama-sharded"), digest(ADAPTERS / "llama-dora")) == before
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_existing_output_is_kept_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert_clean_error(run_cli("merge", BASES / "llama", ADAPTERS / "llama-basic", out), "already exists", code=1)
    assert (out / "mine.txt").read_text() == "keep"
    assert run_cli("merge", BASES / "llama", ADAPTERS / "llama-basic", out, "--force").returncode == 0
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_may_not_overlap_an_input(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASES / "llama", base)
    assert_clean_error(run_cli("merge", base, ADAPTERS / "llama-basic", base, "--force"), "overlaps an input", code=2)
    assert_clean_error(run_cli("merge", base, ADAPTERS / "llama-basic", base / "merged"), "overlaps an input", code=2)
    assert sorted(p.name for p in base.iterdir()) == sorted(p.name for p in (BASES / "llama").iterdir())


def test_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    calls = []
    real = merge_shard._merge_tensor

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_shard, "_merge_tensor", flaky)
    with pytest.raises(OSError):
        loratools.merge(BASES / "llama-sharded", ADAPTERS / "llama-basic", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_shape_mismatch_fails_before_writing(tmp_path):
    save_llama_variant(tmp_path / "wider", hidden_size=32)
    result = run_cli("merge", tmp_path / "wider", ADAPTERS / "llama-basic", tmp_path / "out")
    assert_clean_error(result, "module model.layers.0.mlp.down_proj", "[16, 24]", "base has [32, 24]", code=1)
    assert not (tmp_path / "out").exists()


def test_module_missing_from_base_is_an_error(tmp_path):
    save_llama_variant(tmp_path / "shallow", num_hidden_layers=1)
    result = run_cli("merge", tmp_path / "shallow", ADAPTERS / "llama-basic", tmp_path / "out")
    assert_clean_error(result, "model.layers.1", "no tensor", code=1)
    assert not (tmp_path / "out").exists()


def test_lora_bias_needs_a_base_bias(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_base("llama"), LoraConfig(r=2, target_modules=["o_proj"], lora_bias=True, init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "adapter"))
    assert_clean_error(run_cli("merge", BASES / "llama", tmp_path / "adapter", tmp_path / "out"), "has no bias", code=1)


def test_device_selection(tmp_path):
    assert merge_mod.resolve_device("cpu").type == "cpu"
    assert merge_mod.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert_clean_error(run_cli("merge", BASES / "llama", ADAPTERS / "llama-basic", tmp_path / "o", "--device", "tpu"), "--device", code=2)
    if not torch.cuda.is_available():
        assert_clean_error(run_cli("merge", BASES / "llama", ADAPTERS / "llama-basic", tmp_path / "o", "--device", "cuda"), "CUDA is not available", code=2)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_equals_cpu_merge(tmp_path):
    """The pinned, asynchronous device pipeline gives the CPU's numbers (DoRA; plain LoRA on a
    sharded base, which on CPU takes the numpy kernel; a bf16 base with an embedding)."""
    bf16 = tmp_path / "bf16"
    build_base("llama").to(torch.bfloat16).save_pretrained(str(bf16))
    for i, (base, adapter) in enumerate([(BASES / "llama", "llama-dora"), (BASES / "llama-sharded", "llama-basic"), (bf16, "llama-embedding")]):
        loratools.merge(base, ADAPTERS / adapter, tmp_path / f"cpu{i}", device="cpu")
        report = loratools.merge(base, ADAPTERS / adapter, tmp_path / f"gpu{i}", device="cuda")
        assert report.device.startswith("cuda") and report.workers == 1
        a, b = merged_tensors(tmp_path / f"cpu{i}"), merged_tensors(tmp_path / f"gpu{i}")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-2 if a[k].dtype == torch.bfloat16 else 1e-5, atol=1e-6)


def test_json_summary(tmp_path):
    result = run_cli("merge", BASES / "bert", ADAPTERS / "bert-modules-to-save", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"schema_version", "base", "adapter", "out", "device", "shards", "workers", "tensors", "tensors_changed",
                           "tensors_replaced", "bytes_written", "seconds", "skipped_files", "base_quantization", "keep_quantized"}
    assert report["base_quantization"] is None and report["keep_quantized"] is False
    assert report["tensors_changed"] == 4 and report["tensors_replaced"] == 6 and report["device"] == "cpu"
    assert report["workers"] == 1  # one shard
    assert report["bytes_written"] == (tmp_path / "out" / "model.safetensors").stat().st_size


def test_quiet_and_piped_output(tmp_path):
    result = run_cli("merge", BASES / "llama", ADAPTERS / "llama-basic", tmp_path / "q", "--quiet")
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    result = run_cli("merge", BASES / "llama", ADAPTERS / "llama-basic", tmp_path / "p")
    assert result.stderr == "" and result.stdout.startswith("merged into")  # no progress bar when piped


def test_base_from_the_hub_cache(tmp_path):
    from tests.hub_cache import add_snapshot

    files = {p.name: p for p in (BASES / "llama-sharded").iterdir()}
    add_snapshot(tmp_path / "hub", "loratools-test/tiny-llama", "c" * 40, files)
    out = tmp_path / "out"
    result = run_cli("merge", "loratools-test/tiny-llama", ADAPTERS / "llama-basic", out, env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert result.returncode == 0, result.stderr
    assert not any(p.is_symlink() for p in out.iterdir())  # real files, not links into the cache
    reference = peft_merged_state_dict("llama", BASES / "llama-sharded", ADAPTERS / "llama-basic")
    assert_matches_peft(merged_tensors(out), reference)


def test_progress_bar_on_a_terminal(tmp_path):
    """With stderr on a terminal, merge draws a progress bar there (and still prints its summary)."""
    import os
    import pty
    import subprocess

    from tests.conftest import LORATOOLS

    master, slave = pty.openpty()
    proc = subprocess.run([LORATOOLS, "merge", BASES / "llama-sharded", ADAPTERS / "llama-basic", tmp_path / "out"],
                          stdout=subprocess.PIPE, stderr=slave, timeout=120)
    os.close(slave)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    assert proc.returncode == 0 and proc.stdout.startswith(b"merged into")
    assert b"merging" in drawn and b"100%" in drawn


def test_base_saved_without_the_backbone_prefix(tmp_path):
    """The original GPT-2 checkpoint on the Hub stores `h.0.attn.c_attn.weight`, not
    `transformer.h.0...`: adapter names are matched with the prefix dropped, and OUT keeps the
    base's own names."""
    from safetensors.torch import save_file

    base = tmp_path / "gpt2-no-prefix"
    shutil.copytree(BASES / "gpt2", base)
    tensors = load_file(str(base / "model.safetensors"))
    stripped = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    assert set(stripped) != set(tensors)
    save_file(stripped, str(base / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert run_cli("merge", base, ADAPTERS / "gpt2-conv1d", out).returncode == 0
    ours = merged_tensors(out)
    assert set(ours) == set(stripped)
    reference = peft_merged_state_dict("gpt2", BASES / "gpt2", ADAPTERS / "gpt2-conv1d")
    assert_matches_peft({f"transformer.{k}" if f"transformer.{k}" in reference else k: v for k, v in ours.items()}, reference)
    # and transformers loads it like the original
    torch.testing.assert_close(outputs(load_base("gpt2", out), "gpt2"), outputs(peft_model("gpt2", ADAPTERS / "gpt2-conv1d"), "gpt2"),
                               rtol=1e-4, atol=1e-5)
