"""Broken inputs give one clean `Error:` line from `loratools info`, a non-zero exit, no traceback."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from tests.broken import CONFIG, WEIGHTS, copy_adapter, drop_tensor, edit_config, edit_header, replace_tensors
from tests.conftest import assert_clean_error, run_cli

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def truncate(a):
    raw = (a / WEIGHTS).read_bytes()
    (a / WEIGHTS).write_bytes(raw[:-100])


def garbage_header(a):
    raw = bytearray((a / WEIGHTS).read_bytes())
    raw[8:40] = b"\x00not json at all\xff" * 2
    (a / WEIGHTS).write_bytes(bytes(raw))


def huge_header_length(a):
    raw = bytearray((a / WEIGHTS).read_bytes())
    raw[:8] = (10**12).to_bytes(8, "little")
    (a / WEIGHTS).write_bytes(bytes(raw))


def tiny_file(a):
    (a / WEIGHTS).write_bytes(b"\x01\x02")


def overlapping_offsets(a):
    def edit(h):  # two tensors of the same size pointing at the same bytes
        k_proj = Q0.replace("q_proj", "k_proj")
        h[f"{k_proj}.lora_A.weight"]["data_offsets"] = h[f"{Q0}.lora_A.weight"]["data_offsets"]
        return h

    edit_header(a, edit)


def unknown_dtype(a):
    def edit(h):
        h[f"{Q0}.lora_A.weight"]["dtype"] = "F12"
        return h

    edit_header(a, edit)


def missing_config(a):
    (a / CONFIG).unlink()


def config_not_json(a):
    (a / CONFIG).write_text("{ r: 4,")


def config_is_a_list(a):
    (a / CONFIG).write_text("[1, 2]")


def config_bad_r(a):
    edit_config(a, lambda c: {**c, "r": "four"})


def config_bad_alpha(a):
    edit_config(a, lambda c: {**c, "lora_alpha": None})


def config_bad_pattern(a):
    edit_config(a, lambda c: {**c, "rank_pattern": {"q_proj(": 2}})


def config_not_lora(a):
    edit_config(a, lambda c: {**c, "peft_type": "IA3"})


def config_no_peft_type(a):
    edit_config(a, lambda c: {k: v for k, v in c.items() if k != "peft_type"})


def orphan_lora_a(a):
    drop_tensor(a, f"{Q0}.lora_B.weight")


def orphan_lora_b(a):
    drop_tensor(a, f"{Q0}.lora_A.weight")


def rank_mismatch(a):
    edit_config(a, lambda c: {**c, "r": 8})


def one_d_factor(a):
    replace_tensors(a, lambda t: {**t, f"{Q0}.lora_A.weight": torch.zeros(0)})


def integer_factor(a):
    replace_tensors(a, lambda t: {**t, f"{Q0}.lora_A.weight": t[f"{Q0}.lora_A.weight"].to(torch.int32)})


def factors_disagree(a):
    replace_tensors(a, lambda t: {**t, f"{Q0}.lora_B.weight": torch.zeros(16, 3)})


def no_weights(a):
    (a / WEIGHTS).unlink()


def config_huge_int(a):
    text = (a / CONFIG).read_text()
    assert '"lora_alpha": 8' in text
    (a / CONFIG).write_text(text.replace('"lora_alpha": 8', '"lora_alpha": ' + "9" * 5000))


def config_deeply_nested(a):
    (a / CONFIG).write_text("[" * 100_000 + "]" * 100_000)


def header_deeply_nested(a):
    from tests.broken import split_safetensors

    _, data = split_safetensors(a / WEIGHTS)
    blob = b"[" * 100_000 + b"]" * 100_000
    (a / WEIGHTS).write_bytes(len(blob).to_bytes(8, "little") + blob + data)


def header_huge_int(a):
    def edit(h):
        h[Q0 + ".lora_A.weight"]["shape"] = "HUGE"
        return h

    edit_header(a, edit)
    raw = (a / WEIGHTS).read_bytes().replace(b'"HUGE"', b"[" + b"7" * 5000 + b"]")
    n = int.from_bytes(raw[:8], "little") + 5000 + 2 - len('"HUGE"')
    (a / WEIGHTS).write_bytes(n.to_bytes(8, "little") + raw[8:])


def metadata_not_strings(a):
    edit_header(a, lambda h: {**h, "__metadata__": {"format": 1}})


def too_many_tensors(a):
    from tests.broken import split_safetensors, write_safetensors

    header, data = split_safetensors(a / WEIGHTS)
    header.update({f"empty.{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(200_001)})
    write_safetensors(a / WEIGHTS, header, data)


def pattern_inline_flag(a):  # Python 3.11's re (PEFT's engine) rejects global flags mid-pattern
    edit_config(a, lambda c: {**c, "rank_pattern": {"(?i)Q_PROJ": 8}})


def too_many_patterns(a):
    edit_config(a, lambda c: {**c, "rank_pattern": {f"layers\\.{i}\\.nothing": 8 for i in range(100_000)}})


def target_modules_bad_regex(a):
    edit_config(a, lambda c: {**c, "target_modules": ".*(q_proj"})


BROKEN = {
    truncate: "truncated",
    garbage_header: "header is not valid JSON",
    huge_header_length: "does not fit",
    tiny_file: "too short",
    overlapping_offsets: "overlaps",
    unknown_dtype: "unknown dtype 'F12'",
    missing_config: "no adapter_config.json",
    config_not_json: "not valid JSON",
    config_is_a_list: "expected a JSON object",
    config_bad_r: "r must be a positive integer",
    config_bad_alpha: "lora_alpha must be a number",
    config_bad_pattern: "not a valid regex",
    config_not_lora: "LoRA adapters only",
    config_no_peft_type: "no peft_type",
    orphan_lora_a: "lora_A.weight has no matching lora_B.weight",
    orphan_lora_b: "lora_B.weight has no matching lora_A.weight",
    rank_mismatch: "rank 4 but the config gives r=8",
    one_d_factor: "ZeRO-3/FSDP",
    integer_factor: "must be floating point",
    factors_disagree: "disagree on the rank",
    no_weights: "no adapter_model.safetensors",
    config_huge_int: "not valid JSON",
    config_deeply_nested: "not valid JSON (nested too deeply)",
    header_deeply_nested: "header is not valid JSON",
    header_huge_int: "header is not valid JSON",
    metadata_not_strings: "__metadata__ must map strings to strings",
    too_many_tensors: "more than 200000",
    pattern_inline_flag: "not a valid regex",
    too_many_patterns: "more than 20000",
    target_modules_bad_regex: "target_modules",
}


@pytest.mark.parametrize("mutate", list(BROKEN), ids=[f.__name__ for f in BROKEN])
def test_broken_adapter_gives_one_clean_line(tmp_path, mutate):
    adapter = copy_adapter(tmp_path)
    mutate(adapter)
    for args in (["info", adapter], ["info", "--json", adapter]):
        result = run_cli(*args)
        assert_clean_error(result, BROKEN[mutate], code=1)
        assert result.stdout == ""


def test_debug_shows_the_traceback(tmp_path):
    adapter = copy_adapter(tmp_path)
    truncate(adapter)
    result = run_cli("--debug", "info", adapter)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_missing_path():
    assert_clean_error(run_cli("info", "/nonexistent/adapter"), "no such file or directory", code=1)


def test_usage_error_exits_2():
    result = run_cli("info")
    assert result.returncode == 2 and "Traceback" not in result.stderr


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_is_refused_not_run(tmp_path):
    adapter = copy_adapter(tmp_path, "llama-legacy-bin")
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Evil()}))
    result = run_cli("info", adapter)
    assert_clean_error(result, "refused", code=1)
    assert "pwned" not in result.stdout


def test_pickle_of_tensors_in_a_torch_zip_with_an_object_is_refused(tmp_path):
    adapter = copy_adapter(tmp_path, "llama-legacy-bin")
    torch.save({"x": torch.zeros(2), "y": _Evil()}, str(adapter / "adapter_model.bin"))
    assert_clean_error(run_cli("info", adapter), "refused", code=1)


def test_garbage_bin(tmp_path):
    adapter = copy_adapter(tmp_path, "llama-legacy-bin")
    (adapter / "adapter_model.bin").write_bytes(b"PK\x03\x04 this is not a torch file")
    assert_clean_error(run_cli("info", adapter), "adapter_model.bin", code=1)


def test_json_output_is_json(tmp_path):
    result = run_cli("info", "--json", copy_adapter(tmp_path))
    assert result.returncode == 0 and json.loads(result.stdout)["num_modules"] == 14


def test_broken_adapter_is_a_finding_in_validate(tmp_path):
    """The same breakages, given to validate beside a good adapter: each is a finding with a stable
    code, the good one still passes, and the JSON report has both."""
    for mutate in BROKEN:
        adapter = copy_adapter(tmp_path / mutate.__name__)
        mutate(adapter)
        result = run_cli("validate", "--json", adapter, copy_adapter(tmp_path / f"{mutate.__name__}-good"))
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        bad, good = json.loads(result.stdout)["results"]
        assert good["ok"] and not bad["ok"], mutate.__name__
        assert all(f["code"] not in ("internal-error", "error") for f in bad["findings"]), bad


def test_catastrophic_patterns_do_not_hang(tmp_path):
    """With Python's re, `(.*)*x` takes minutes per module path; loratools matches with a timeout."""
    adapter = copy_adapter(tmp_path)
    edit_config(adapter, lambda c: {**c, "rank_pattern": {"(.*)*x": 4, "(a+)+$": 4}, "alpha_pattern": {"(\\w+\\.?)+z": 2}})
    for args in (["info", adapter], ["validate", adapter]):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr


def test_a_pattern_that_times_out_is_a_clean_error():
    from loratools.config import pattern_matches
    from loratools.errors import ConfigError

    with pytest.raises(ConfigError, match="too long to match"):
        pattern_matches("(a|a)*b", "base_model.model.model.layers.10.self_attn." + "a" * 28 + "_proj")


def test_zip_bomb_bin_is_refused_before_loading(tmp_path):
    import zipfile

    adapter = copy_adapter(tmp_path, "llama-legacy-bin")
    with zipfile.ZipFile(adapter / "adapter_model.bin", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}))
        archive.writestr("archive/data/0", b"\0" * (64 << 20))
    assert (adapter / "adapter_model.bin").stat().st_size < 1 << 20
    result = run_cli("info", adapter)
    assert_clean_error(result, "expand to", code=1)
    result = run_cli("validate", "--json", adapter)
    assert result.returncode == 1 and "pickle-refused" in result.stdout


def test_text_bin_is_a_clean_error(tmp_path):
    adapter = copy_adapter(tmp_path, "llama-legacy-bin")
    (adapter / "adapter_model.bin").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    assert_clean_error(run_cli("info", adapter), "adapter_model.bin", code=1)
    assert "pickle-refused" in run_cli("validate", "--json", adapter).stdout


def test_one_crashing_adapter_does_not_empty_the_report(tmp_path, monkeypatch):
    from loratools.ops import validate as validate_mod

    real = validate_mod.validate

    def flaky(path, base=None, target=None):
        if "second" in str(path):
            raise RuntimeError("boom")
        return real(path, base, target)

    monkeypatch.setattr(validate_mod, "validate", flaky)
    paths = [copy_adapter(tmp_path / name) for name in ("first", "second", "third")]
    results = validate_mod.validate_many(paths)
    assert [r.ok() for r in results] == [True, False, True]
    assert results[1].findings[0].code == "internal-error"
