"""Serving: `validate --target vllm|llama.cpp` and `convert --to-lora` (scaling 1 everywhere)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ADAPTERS, assert_clean_error, run_cli
from tests.peft_ref import peft_model
from tests.tiny_models import build_base


def _codes(adapter, target: str) -> dict[str, str]:
    result = run_cli("validate", adapter, "--target", target, "--json")
    findings = json.loads(result.stdout)["results"][0]["findings"]
    assert result.returncode == (1 if any(f["severity"] == "error" for f in findings) else 0)
    return {f["code"]: f["severity"] for f in findings}


@pytest.mark.parametrize("adapter,expected", [
    ("llama-basic", {}),
    ("llama-dora", {"vllm-dora": "error"}),
    ("llama-rslora-patterns", {"vllm-scaling": "error"}),
    ("bert-modules-to-save", {"vllm-modules-to-save": "error", "vllm-bias": "warning"}),
    ("gpt2-lora-bias", {"vllm-tensor": "error"}),
])
def test_vllm_rules(adapter, expected):
    codes = {c: s for c, s in _codes(ADAPTERS / adapter, "vllm").items() if c.startswith("vllm-")}
    assert codes == expected


@pytest.mark.parametrize("adapter,expected", [
    ("llama-basic", {}),
    ("llama-dora", {"llamacpp-unsupported": "error"}),
    ("llama-rslora-patterns", {"llamacpp-scaling": "warning"}),
    ("gpt2-conv1d", {"llamacpp-unsupported": "error", "llamacpp-arch": "warning"}),
    ("bert-modules-to-save", {"llamacpp-unsupported": "error", "llamacpp-arch": "warning"}),
])
def test_llama_cpp_rules(adapter, expected):
    codes = {c: s for c, s in _codes(ADAPTERS / adapter, "llama.cpp").items() if c.startswith("llamacpp-")}
    assert codes == expected


def test_vllm_rank_needs_a_larger_max_lora_rank(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(build_base("llama"), LoraConfig(r=40, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    result = run_cli("validate", tmp_path / "a", "--target", "vllm")
    assert result.returncode == 0 and "--max-lora-rank 64" in result.stdout  # a warning: it loads with the flag
    assert run_cli("validate", tmp_path / "a", "--target", "vllm", "--strict").returncode == 1


@pytest.mark.parametrize("adapter", ["llama-rslora-patterns", "gpt2-lora-bias", "llama-embedding"])
def test_to_lora_keeps_every_delta_and_sets_scaling_one(tmp_path, adapter):
    family = {"gpt2-lora-bias": "gpt2"}.get(adapter, "llama")
    out = tmp_path / "plain"
    result = run_cli("convert", ADAPTERS / adapter, out, "--to-lora", "--json")
    assert result.returncode == 0, result.stderr
    before, after = peft_model(family, ADAPTERS / adapter), peft_model(family, out)
    layers = {n: m for n, m in after.named_modules() if hasattr(m, "get_delta_weight") and "default" in getattr(m, "r", {})}
    assert layers
    for name, module in before.named_modules():
        if name in layers:
            assert layers[name].scaling["default"] == 1.0, name
            torch.testing.assert_close(layers[name].get_delta_weight("default"), module.get_delta_weight("default"),
                                       rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(after(input_ids=ids).logits, before(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert "vllm-scaling" not in _codes(out, "vllm")


def test_to_lora_refuses_what_depends_on_the_base(tmp_path):
    assert_clean_error(run_cli("convert", ADAPTERS / "llama-dora", tmp_path / "o", "--to-lora"), "DoRA", "merge it")
    result = run_cli("convert", ADAPTERS / "llama-basic", tmp_path / "o", "--to-lora", "--to", "gpt2")
    assert result.returncode == 2 and "does not combine with --to" in result.stderr
    assert not (tmp_path / "o").exists()
