"""`loratools validate`: every PEFT-made fixture is clean; every broken one gets its own code."""

from __future__ import annotations

import json
import pickle
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratools.ops.validate import validate
from tests import test_errors as broken_files
from tests.broken import WEIGHTS, copy_adapter, edit_config, replace_tensors, split_safetensors, write_safetensors
from tests.conftest import ADAPTERS, BASES, run_cli
from tests.tiny_models import save_llama_variant

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _tensors(edit):
    return lambda a: replace_tensors(a, edit)


def _set(key, value):
    return _tensors(lambda t: {**t, key: value})


def _rename(*pairs):
    """_rename(old1, new1, old2, new2, ...)"""

    def edit(t):
        t = dict(t)
        for old, new in zip(pairs[::2], pairs[1::2]):
            t[new] = t.pop(old)
        return t

    return _tensors(edit)


def _evil_pickle(a):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (a / WEIGHTS).unlink()
    (a / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))


def _gap(a):
    """Every tensor shifted 4 bytes into the buffer: sizes fit, but the first bytes belong to none."""
    header, data = split_safetensors(a / WEIGHTS)
    for key, entry in header.items():
        if key != "__metadata__":
            entry["data_offsets"] = [o + 4 for o in entry["data_offsets"]]
    write_safetensors(a / WEIGHTS, header, b"\0" * 4 + data)


def _trailing(a):
    (a / WEIGHTS).write_bytes((a / WEIGHTS).read_bytes() + b"\0" * 16)


def _config_edit(**changes):
    return lambda a: edit_config(a, lambda c: {**c, **changes})


# (mutation, adapter it starts from, expected code, severity)
CATALOGUE = [
    # files
    (broken_files.missing_config, "llama-basic", "config-missing", "error"),
    (broken_files.config_not_json, "llama-basic", "config-json", "error"),
    (broken_files.config_is_a_list, "llama-basic", "config-json", "error"),
    (broken_files.no_weights, "llama-basic", "weights-missing", "error"),
    (_evil_pickle, "llama-basic", "pickle-refused", "error"),
    (broken_files.truncate, "llama-basic", "st-truncated", "error"),
    (broken_files.garbage_header, "llama-basic", "st-header-json", "error"),
    (broken_files.huge_header_length, "llama-basic", "st-header-length", "error"),
    (broken_files.tiny_file, "llama-basic", "st-too-short", "error"),
    (broken_files.overlapping_offsets, "llama-basic", "st-overlap", "error"),
    (broken_files.unknown_dtype, "llama-basic", "st-dtype", "error"),
    (_gap, "llama-basic", "st-offsets", "error"),
    (_trailing, "llama-basic", "st-trailing-bytes", "error"),
    # config
    (broken_files.config_not_lora, "llama-basic", "config-peft-type", "error"),
    (broken_files.config_no_peft_type, "llama-basic", "config-peft-type", "error"),
    (broken_files.config_bad_r, "llama-basic", "config-r", "error"),
    (_config_edit(r=0), "llama-basic", "config-r", "error"),
    (broken_files.config_bad_alpha, "llama-basic", "config-alpha", "error"),
    (_config_edit(target_modules=[]), "llama-basic", "config-target-modules", "error"),
    (broken_files.config_bad_pattern, "llama-basic", "config-pattern", "error"),
    (_config_edit(rank_pattern={"q_proj": -1}), "llama-basic", "config-pattern", "error"),
    (_config_edit(alpha_pattern={"nothing_like_this": 3}), "llama-basic", "pattern-unused", "warning"),
    (_config_edit(lora_alhpa=16), "llama-basic", "config-unknown-key", "warning"),
    (_config_edit(use_dora=True), "llama-basic", "dora-mismatch", "error"),
    (_config_edit(use_dora=False), "llama-dora", "dora-mismatch", "error"),
    (_config_edit(fan_in_fan_out=False), "gpt2-conv1d", "fan-in-fan-out", "warning"),
    (_config_edit(fan_in_fan_out=True), "llama-basic", "fan-in-fan-out", "warning"),
    # tensors
    (broken_files.orphan_lora_a, "llama-basic", "orphan-factor", "error"),
    (broken_files.orphan_lora_b, "llama-basic", "orphan-factor", "error"),
    (broken_files.rank_mismatch, "llama-basic", "rank-mismatch", "error"),
    (_config_edit(r=2), "llama-embedding", "rank-mismatch", "error"),
    (broken_files.factors_disagree, "llama-basic", "factor-rank", "error"),
    (broken_files.one_d_factor, "llama-basic", "unsharded-factor", "error"),
    (_set(f"{Q0}.lora_B.weight", torch.zeros(16 * 4)), "llama-basic", "unsharded-factor", "error"),
    (broken_files.integer_factor, "llama-basic", "non-float-factor", "error"),
    (_set(f"{Q0}.lora_A.weight", torch.full((4, 16), float("nan"))), "llama-basic", "non-finite", "error"),
    (_set(f"{Q0}.lora_B.weight", torch.full((16, 4), float("inf"))), "llama-basic", "non-finite", "error"),
    (_set(f"{Q0}.lora_B.weight", torch.zeros(16, 4)), "llama-basic", "zero-lora-b", "warning"),
    (_rename(f"{Q0}.lora_A.weight", "model.layers.0.self_attn.q_proj.lora_A.weight"), "llama-basic", "key-prefix", "error"),
    (_rename(f"{Q0}.lora_A.weight", f"{Q0}.lora_A.default.weight", f"{Q0}.lora_B.weight", f"{Q0}.lora_B.default.weight"),
     "llama-basic", "key-adapter-name", "error"),
    (_set("base_model.model.model.norm.scale", torch.ones(16)), "llama-basic", "unknown-tensor", "error"),
    (_set(f"{Q0}.lora_magnitude_vector", torch.ones(15)), "llama-dora", "vector-shape", "error"),
    (_set(f"{Q0}.lora_magnitude_vector", torch.ones(16)), "llama-basic", "dora-mismatch", "error"),
    (_set(f"{Q0}.lora_B.bias", torch.ones(16)), "llama-basic", "lora-bias-mismatch", "error"),
    (_config_edit(lora_bias=False), "gpt2-lora-bias", "lora-bias-mismatch", "error"),
    (_config_edit(lora_bias=True), "gpt2-conv1d", "lora-bias-mismatch", "error"),
    (_set("base_model.model.model.layers.0.self_attn.k_proj.lora_magnitude_vector", torch.ones(8)), "llama-dora", "stray-tensor", "error"),
]


def _catalogue_id(entry):
    mutate, source, code, _ = entry
    return f"{code}-{getattr(mutate, '__name__', 'edit')}-{source}"


@pytest.mark.parametrize("fixture", sorted(p.name for p in ADAPTERS.iterdir()))
def test_every_fixture_validates_clean(fixture):
    result = validate(ADAPTERS / fixture)
    expected = [("pickle-weights", "warning")] if fixture == "llama-legacy-bin" else []
    assert [(f.code, f.severity) for f in result.findings] == expected


@pytest.mark.parametrize("entry", CATALOGUE, ids=[_catalogue_id(e) for e in CATALOGUE])
def test_catalogue_of_broken_adapters(tmp_path, entry):
    mutate, source, code, severity = entry
    adapter = copy_adapter(tmp_path, source)
    mutate(adapter)
    result = run_cli("validate", "--json", adapter)
    assert "Traceback" not in result.stderr and result.stderr == ""
    report = json.loads(result.stdout)
    findings = report["results"][0]["findings"]
    assert (code, severity) in [(f["code"], f["severity"]) for f in findings], findings
    assert all(set(f) == {"code", "severity", "module", "message"} and f["message"] for f in findings)
    if severity == "error":
        assert result.returncode == 1 and report["results"][0]["ok"] is False
    else:
        assert result.returncode == 0
        assert run_cli("validate", "--strict", adapter).returncode == 1


def test_unmutated_copy_is_clean(tmp_path):
    """The catalogue's starting points are clean: each finding above comes from its mutation."""
    for source in {e[1] for e in CATALOGUE}:
        result = run_cli("validate", "--strict", copy_adapter(tmp_path / source, source))
        assert result.returncode == 0, result.stdout


def test_every_finding_code_is_documented():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for _, _, code, _ in CATALOGUE:
        assert f"`{code}`" in readme, code
    for code in ("base-shape", "base-missing-module", "base-vocab-size", "base-architecture", "not-found", "pickle-weights"):
        assert f"`{code}`" in readme, code


# ---- against a base ---------------------------------------------------------------------------


def test_base_hidden_size_mismatch(tmp_path):
    save_llama_variant(tmp_path / "wider", hidden_size=32)
    report = json.loads(run_cli("validate", "--json", ADAPTERS / "llama-basic", "--base", tmp_path / "wider").stdout)
    codes = {f["code"] for f in report["results"][0]["findings"]}
    assert codes == {"base-shape"}
    assert any("[16, 24]" in f["message"] and "[32, 24]" in f["message"] for f in report["results"][0]["findings"])


def test_base_missing_module(tmp_path):
    save_llama_variant(tmp_path / "shallow", num_hidden_layers=1)
    result = run_cli("validate", "--json", ADAPTERS / "llama-basic", "--base", tmp_path / "shallow")
    assert result.returncode == 1
    findings = json.loads(result.stdout)["results"][0]["findings"]
    assert {f["code"] for f in findings} == {"base-missing-module"}
    assert {f["module"] for f in findings} == {p for p in __import__("loratools").load_adapter(ADAPTERS / "llama-basic").modules if ".1." in p}


def test_base_vocab_and_modules_to_save(tmp_path):
    save_llama_variant(tmp_path / "vocab", vocab_size=80)
    findings = validate(ADAPTERS / "llama-embedding", __import__("loratools.formats.checkpoint", fromlist=["x"]).open_checkpoint(tmp_path / "vocab")).findings
    assert "base-vocab-size" in {f.code for f in findings}
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=64, num_labels=2)
    tf.BertForSequenceClassification(cfg).save_pretrained(str(tmp_path / "bert2"))
    result = run_cli("validate", "--json", ADAPTERS / "bert-modules-to-save", "--base", tmp_path / "bert2")
    findings = json.loads(result.stdout)["results"][0]["findings"]
    assert {(f["code"], f["module"]) for f in findings} == {("base-shape", "classifier.weight"), ("base-shape", "classifier.bias")}


def test_base_architecture_and_matching_bases():
    assert run_cli("validate", ADAPTERS / "llama-basic", "--base", BASES / "llama-sharded").returncode == 0
    assert run_cli("validate", ADAPTERS / "gpt2-conv1d", "--base", BASES / "gpt2" / "model.safetensors").returncode == 0
    result = run_cli("validate", "--json", ADAPTERS / "llama-basic", "--base", BASES / "bert")
    assert [f["code"] for f in json.loads(result.stdout)["results"][0]["findings"]] == ["base-architecture"]


# ---- many adapters, output, exit codes --------------------------------------------------------


def test_many_adapters_and_the_summary(tmp_path):
    bad = copy_adapter(tmp_path, "llama-basic")
    broken_files.truncate(bad)
    result = run_cli("validate", "--json", ADAPTERS / "gpt2-conv1d", bad, ADAPTERS / "llama-legacy-bin", tmp_path / "missing")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert [r["ok"] for r in report["results"]] == [True, False, True, False]
    assert report["summary"] == {"adapters": 4, "ok": 2, "failed": 2, "errors": 2, "warnings": 1, "strict": False}
    text = run_cli("validate", ADAPTERS / "gpt2-conv1d", bad).stdout
    assert "FAIL" in text and "st-truncated" in text and "1 of 2 adapter(s) valid" in text


def test_files_of_one_adapter_are_checked_once():
    d = ADAPTERS / "llama-basic"
    report = json.loads(run_cli("validate", "--json", d / "adapter_config.json", d / "adapter_model.safetensors").stdout)
    assert report["summary"]["adapters"] == 1


def test_usage_errors_exit_2():
    assert run_cli("validate").returncode == 2
    assert run_cli("validate", ADAPTERS / "llama-basic", "--bogus").returncode == 2


def test_pre_commit_hook_definition():
    from pathlib import Path

    import yaml

    hooks = yaml.safe_load((Path(__file__).resolve().parent.parent / ".pre-commit-hooks.yaml").read_text())
    hook = next(h for h in hooks if h["id"] == "loratools-validate")
    assert hook["entry"] == "loratools validate" and hook["language"] == "python"
    import re

    assert re.search(hook["files"], "adapters/a/adapter_model.safetensors")
    assert re.search(hook["files"], "adapter_config.json") and not re.search(hook["files"], "model.safetensors")


# ---- fuzzing ------------------------------------------------------------------------------------

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
CONFIG_KEYS = ["peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_dora", "use_rslora", "fan_in_fan_out",
               "target_modules", "modules_to_save", "bias", "lora_bias", "auto_mapping", "something_else"]


@FUZZ
@given(data=st.data())
def test_fuzzed_adapters_never_crash_validate(tmp_path_factory, data):
    """Mutate a real adapter's header bytes, config fields and tensors at random: validate always
    returns findings (never raises), and every finding is well-formed."""
    work = tmp_path_factory.mktemp("fz")
    source = ADAPTERS / data.draw(st.sampled_from(["llama-dora", "gpt2-lora-bias", "bert-modules-to-save"]))
    shutil.copytree(source, work / "a")
    a = work / "a"
    kind = data.draw(st.sampled_from(["header-bytes", "config", "tensor", "truncate"]))
    if kind == "header-bytes":
        raw = bytearray((a / WEIGHTS).read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        for _ in range(data.draw(st.integers(1, 3))):
            raw[data.draw(st.integers(0, 8 + n - 1))] = data.draw(st.integers(0, 255))
        (a / WEIGHTS).write_bytes(bytes(raw))
    elif kind == "config":
        fields = data.draw(st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=4))
        edit_config(a, lambda c: {**c, **fields})
    elif kind == "tensor":
        from safetensors.torch import load_file

        tensors = load_file(str(a / WEIGHTS))
        key = data.draw(st.sampled_from(sorted(tensors)))
        shape = data.draw(st.lists(st.integers(0, 5), max_size=3))
        dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.float16]))
        value = data.draw(st.sampled_from([0.0, 1.0, float("nan"), float("inf")]))
        if data.draw(st.booleans()):
            tensors[key] = torch.full(shape, value).to(dtype)
        else:
            tensors.pop(key)
        replace_tensors(a, lambda _: tensors)
    else:
        raw = (a / WEIGHTS).read_bytes()
        (a / WEIGHTS).write_bytes(raw[: data.draw(st.integers(0, len(raw)))])
    result = validate(a)
    for f in result.findings:
        assert f.severity in ("error", "warning") and f.code and f.message
