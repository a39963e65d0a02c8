"""Hostile files and failing disks: every one is one `Error:` line with a stable code, never a hang,
an unbounded read, a numpy warning or a traceback, and nothing is written."""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.broken import CONFIG, WEIGHTS, copy_adapter
from tests.conftest import ADAPTERS, BASES, LORATOOLS, assert_clean_error, run_cli

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def assert_nothing_written(out: Path) -> None:
    """No OUT, and no temporary sibling of it left behind."""
    assert not out.exists() and not out.is_symlink()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


def findings(*args) -> list[str]:
    result = run_cli("validate", "--json", *args)
    assert result.returncode == 1, result.stderr
    return [f["code"] for f in json.loads(result.stdout)["results"][0]["findings"]]


def set_tensor(adapter: Path, key: str, edit) -> None:
    tensors = load_file(str(adapter / WEIGHTS))
    tensors[key] = edit(tensors[key].copy())
    save_file(tensors, str(adapter / WEIGHTS), metadata={"format": "pt"})


def nan_adapter(tmp_path: Path, value: float = float("nan"), name: str = "nan") -> Path:
    adapter = copy_adapter(tmp_path / name)
    set_tensor(adapter, f"{Q0}.lora_A.weight", lambda t: np.where(np.arange(t.size).reshape(t.shape) == 3, value, t).astype(t.dtype))
    return adapter


# ---- 1. JSON files: regular files of bounded size only ------------------------------------------


def replace_with(path: Path, kind: str) -> None:
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    else:  # "huge": a sparse file past the cap, never read
        with open(path, "wb") as fh:
            fh.truncate((64 << 20) + 1)


@pytest.mark.parametrize("kind, fragment, code", [
    ("fifo", "is a FIFO (named pipe), not a regular file", "not-a-file"),
    ("dev-zero", "is a character device, not a regular file", "not-a-file"),
    ("directory", "is a directory, not a regular file", "not-a-file"),
    ("huge", "more than the 64 MiB loratools reads from a JSON file", "too-large"),
])
def test_adapter_config_that_is_not_a_small_regular_file(tmp_path, kind, fragment, code):
    adapter = copy_adapter(tmp_path)
    replace_with(adapter / CONFIG, kind)
    assert_clean_error(run_cli("info", adapter), f"{adapter / CONFIG}: ", fragment, code=1)
    out = tmp_path / "out"
    assert_clean_error(run_cli("convert", adapter, out, "--to-lora"), fragment, code=1)
    assert_nothing_written(out)


def test_a_symlink_to_a_regular_config_is_read(tmp_path):
    adapter = copy_adapter(tmp_path)
    real = tmp_path / "elsewhere.json"
    shutil.move(adapter / CONFIG, real)
    (adapter / CONFIG).symlink_to(real)
    assert run_cli("info", adapter).returncode == 0


@pytest.mark.parametrize("name, kind, fragment", [
    ("config.json", "dev-zero", "is a character device"),
    ("model.safetensors.index.json", "fifo", "is a FIFO"),
    ("model.safetensors.index.json", "huge", "more than the 64 MiB"),
    ("model-00002-of-00004.safetensors", "fifo", "is a FIFO"),
    ("tokenizer.json", "fifo", "is a FIFO"),  # any file merge would copy into OUT
])
def test_base_files_that_are_not_regular_files(tmp_path, name, kind, fragment):
    base = tmp_path / "base"
    shutil.copytree(BASES / "llama-sharded", base)
    replace_with(base / name, kind)
    assert_clean_error(run_cli("info", ADAPTERS / "llama-basic", "--base", base), f"{base / name}: ", fragment, code=1)
    out = tmp_path / "out"
    assert_clean_error(run_cli("merge", base, ADAPTERS / "llama-basic", out), fragment, code=1)
    assert_nothing_written(out)


def test_weights_that_are_a_fifo(tmp_path):
    adapter = copy_adapter(tmp_path)
    replace_with(adapter / WEIGHTS, "fifo")
    for target in (adapter, adapter / WEIGHTS):
        assert_clean_error(run_cli("info", target), "is a FIFO (named pipe), not a regular file", code=1)
    assert "not-a-file" in findings(adapter)


@pytest.mark.parametrize("kind, code", [("fifo", "not-a-file"), ("dev-zero", "not-a-file"), ("huge", "too-large")])
def test_validate_reports_config_files_it_does_not_read(tmp_path, kind, code):
    adapter = copy_adapter(tmp_path)
    replace_with(adapter / CONFIG, kind)
    assert code in findings(adapter)


def test_a_base_directory_linking_to_itself_is_walked_once(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASES / "llama", base)
    for name in ("loop", "again"):  # two links to the directory itself: 2^depth paths if followed blindly
        (base / name).symlink_to(".")
    result = run_cli("merge", base, ADAPTERS / "llama-basic", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


# ---- 2. a legacy .bin that is not a weights_only pickle of tensors ------------------------------


@pytest.mark.parametrize("content", [b"hello, this is a text file\n", b"", bytes(range(256)) * 4, b"\x80\x02}q\x00."])
def test_bin_that_is_not_a_pickle_of_tensors(tmp_path, content):
    adapter = tmp_path / "bin"
    shutil.copytree(ADAPTERS / "llama-legacy-bin", adapter)
    (adapter / "adapter_model.bin").write_bytes(content)
    assert_clean_error(run_cli("info", adapter), "adapter_model.bin: ", code=1)
    assert "pickle-refused" in findings(adapter)
    out = tmp_path / "out"
    assert_clean_error(run_cli("convert", adapter, out, "--to-lora"), "adapter_model.bin: ", code=1)
    assert_nothing_written(out)


def test_text_bin_names_what_it_is_not(tmp_path):
    adapter = tmp_path / "bin"
    shutil.copytree(ADAPTERS / "llama-legacy-bin", adapter)
    (adapter / "adapter_model.bin").write_text("hello, this is a text file\n")
    assert_clean_error(run_cli("info", adapter), "adapter_model.bin: not a torch checkpoint of tensors", code=1)


# ---- 3. a safetensors header above the format's cap ---------------------------------------------


def test_header_above_the_cap_says_which_cap(tmp_path):
    adapter = copy_adapter(tmp_path)
    n = 101_000_000
    with open(adapter / WEIGHTS, "wb") as fh:  # sparse: a header of 101 MB that fits in the file
        fh.write(struct.pack("<Q", n))
        fh.truncate(8 + n + 16)
    assert_clean_error(run_cli("info", adapter), "the header is 101,000,000 bytes, more than the 100,000,000 the "
                       "safetensors format allows", code=1)
    assert "too-large" in findings(adapter)


# ---- 4. writers refuse NaN/Inf, before anything is written ------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("command", [["convert", "{a}", "{out}", "--to-lora"], ["convert", "{a}", "{out}", "--to", "bert", "--drop-unmapped"],
                                     ["combine", "{a}", "{basic}", "--out", "{out}", "--method", "cat"]])
def test_writers_refuse_non_finite_tensors(tmp_path, value, command):
    adapter, out = nan_adapter(tmp_path, value), tmp_path / "out"
    args = [c.format(a=adapter, out=out, basic=ADAPTERS / "llama-basic") for c in command]
    result = run_cli(*args)
    assert_clean_error(result, ".lora_A.weight contains NaN or Inf: loratools writes only finite tensors",
                       f"nothing was written to {out}", code=1)
    assert_nothing_written(out)


def test_combine_overflowing_float32_is_refused(tmp_path):
    out = tmp_path / "out"
    basic = ADAPTERS / "llama-basic"
    result = run_cli("combine", basic, basic, "--out", out, "--method", "cat", "--weights", "3e38,3e38")
    assert_clean_error(result, ".lora_A.weight contains NaN or Inf", "overflowed", code=1)
    assert_nothing_written(out)


# ---- 5. the low-rank math refuses non-finite factors ---------------------------------------------


@pytest.mark.parametrize("command", [["svd", "{a}"], ["svd", "{a}", "--json"], ["resize", "{a}", "{out}", "--rank", "2"],
                                     ["combine", "{a}", "{basic}", "--out", "{out}", "--method", "svd", "--rank", "4"]])
def test_low_rank_math_refuses_nan(tmp_path, command):
    adapter, out = nan_adapter(tmp_path), tmp_path / "out"
    args = [c.format(a=adapter, out=out, basic=ADAPTERS / "llama-basic") for c in command]
    result = run_cli(*args)
    assert_clean_error(result, "module model.layers.0.self_attn.q_proj: NaN or Inf in its LoRA factors",
                       "the SVD needs finite values", code=1)
    assert "LinAlgError" not in result.stderr and result.stdout == ""
    assert_nothing_written(out)


def base_with(tmp_path: Path, name: str, weight: str, value: float) -> Path:
    """The tiny LLaMA base with one element of `weight` set to `value`."""
    base = tmp_path / name
    shutil.copytree(BASES / "llama", base)
    tensors = load_file(str(base / "model.safetensors"))
    tensors[weight] = tensors[weight].copy()
    tensors[weight].flat[5] = value
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    return base


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_extract_refuses_a_non_finite_difference(tmp_path, value):
    tuned, out = base_with(tmp_path, "tuned", "model.layers.1.self_attn.v_proj.weight", value), tmp_path / "out"
    result = run_cli("extract", BASES / "llama", tuned, out, "--rank", "2")
    assert_clean_error(result, "module model.layers.1.self_attn.v_proj: NaN or Inf in FINETUNED − BASE", code=1)
    assert_nothing_written(out)


def test_dora_to_lora_on_a_non_finite_base_is_refused(tmp_path):
    base, out = base_with(tmp_path, "base", "model.layers.0.self_attn.q_proj.weight", float("nan")), tmp_path / "out"
    result = run_cli("convert", ADAPTERS / "llama-dora", out, "--to-lora", "--base", base, "--rank", "4")
    assert_clean_error(result, "module model.layers.0.self_attn.q_proj: NaN or Inf in its DoRA ΔW on --base", code=1)
    assert_nothing_written(out)


def test_float64_factors_that_overflow_products_are_refused_without_warnings(tmp_path):
    adapter = copy_adapter(tmp_path)
    tensors = {k: v.astype(np.float64) for k, v in load_file(str(adapter / WEIGHTS)).items()}
    tensors[f"{Q0}.lora_B.weight"] = np.full_like(tensors[f"{Q0}.lora_B.weight"], 1e200)
    save_file(tensors, str(adapter / WEIGHTS), metadata={"format": "pt"})
    result = run_cli("svd", adapter)
    assert_clean_error(result, "too large for float64 arithmetic", code=1)  # one line: no RuntimeWarning either


# ---- 7. AdaLoRA masks for modules that are not there ----------------------------------------------


def adalora_adapter(root: Path, masks: dict[str, list[bool]]) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    path = "model.layers.0.self_attn.q_proj"
    tensors = {f"base_model.model.{path}.lora_A": rng.standard_normal((1, 16)).astype(np.float32),
               f"base_model.model.{path}.lora_B": rng.standard_normal((16, 1)).astype(np.float32),
               f"base_model.model.{path}.lora_E": rng.standard_normal((1, 1)).astype(np.float32)}
    save_file(tensors, str(root / WEIGHTS))
    config = {"peft_type": "ADALORA", "init_r": 2, "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
              "rank_pattern": {f"{path}.lora_E": [True, False], **masks}}
    (root / CONFIG).write_text(json.dumps(config))
    return root


@pytest.mark.parametrize("key", ["model.layers.7.self_attn.q_proj.lora_E", "model.layers.0.self_attn.q_proj"])
def test_adalora_mask_for_a_missing_module(tmp_path, key):
    adapter = adalora_adapter(tmp_path / "ada", {key: [True, True]})
    assert findings(adapter) == ["adalora-rank"]
    assert_clean_error(run_cli("info", adapter), f"rank_pattern has a mask for {key!r}", "PEFT cannot load it", code=1)
    assert run_cli("info", adalora_adapter(tmp_path / "fine", {})).returncode == 0


# ---- bitsandbytes 4-bit bases: a NaN/Inf scale is refused when the base is opened ---------------


@pytest.fixture(scope="module")
def bnb_bases(tmp_path_factory):
    """A tiny LLaMA saved by transformers + bitsandbytes in 4 bits, with double quant (absmax U8,
    nested_absmax F32) and without (absmax F32), and a LoRA adapter on its q_proj."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tests.quantized_models import save_bf16, save_bnb4, tiny_causal_lm

    root = tmp_path_factory.mktemp("bnb")
    base16 = save_bf16("llama", root / "b16")
    bases = {True: save_bnb4(base16, root / "nested", "nf4", double_quant=True),
             False: save_bnb4(base16, root / "plain", "fp4", double_quant=False)}
    torch.manual_seed(5)
    model = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(root / "adapter")
    return bases, root / "adapter"


@pytest.mark.parametrize("nested,part", [(True, "nested_absmax"), (True, "quant_map"), (True, "nested_quant_map"),
                                         (False, "absmax"), (False, "quant_map")])
@pytest.mark.parametrize("weight", ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"])
@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_a_non_finite_bnb_scale_fails_validate_and_info_base_as_merge(bnb_bases, tmp_path, nested, part, weight, value):
    """Under the adapter or not, a NaN/Inf absmax (or code value) makes its block of the weight
    NaN/Inf: merge refuses the base when it opens it, so validate --base and info --base say the
    same line (quant-state) and nothing is written."""
    import torch
    from safetensors.torch import load_file as load_torch, save_file as save_torch

    bases, adapter = bnb_bases
    base = tmp_path / "base"
    shutil.copytree(bases[nested], base)
    key = f"{weight}.{part}"
    tensors = load_torch(str(base / "model.safetensors"))  # bf16 tensors besides: numpy cannot hold them
    assert tensors[key].dtype == torch.float32
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[-1] = value
    save_torch(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})

    fragment = f"{key}: a bitsandbytes {part} value is NaN or Inf, so {weight} is not finite"
    assert_clean_error(run_cli("merge", base, adapter, tmp_path / "out"), fragment, code=1)
    assert_nothing_written(tmp_path / "out")
    assert_clean_error(run_cli("info", adapter, "--base", base), fragment, code=1)
    result = run_cli("validate", adapter, "--base", base)
    assert_clean_error(result, fragment, code=1)
    assert run_cli("validate", adapter, "--base", bases[nested]).returncode == 0


# ---- failing disks: a write that fails is one line, and leaves nothing ------------------------------


def run_with_file_size_limit(limit: int, *args) -> subprocess.CompletedProcess:
    """The real command, with RLIMIT_FSIZE: writes past `limit` bytes fail with EFBIG, as on a full disk."""
    def limit_writes():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([LORATOOLS, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=limit_writes)


@pytest.mark.parametrize("command", [["convert", "{a}", "{out}", "--to-lora"], ["resize", "{a}", "{out}", "--rank", "2"],
                                     ["merge", "{base}", "{a}", "{out}"]])
def test_a_failing_write_is_one_line_and_leaves_nothing(tmp_path, command):
    out = tmp_path / "out"
    args = [c.format(a=ADAPTERS / "llama-basic", out=out, base=BASES / "llama") for c in command]
    result = run_with_file_size_limit(4096, *args)
    assert_clean_error(result, f"{out}: ", "nothing was written", code=1)
    assert "File too large" in result.stderr
    assert_nothing_written(out)
