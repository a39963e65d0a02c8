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
