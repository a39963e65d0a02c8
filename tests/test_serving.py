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


def test_to_lora_refuses_mixing_with_renaming(tmp_path):
    result = run_cli("convert", ADAPTERS / "llama-basic", tmp_path / "o", "--to-lora", "--to", "gpt2")
    assert result.returncode == 2 and "does not combine with --to" in result.stderr
    assert not (tmp_path / "o").exists()


# ---- DoRA -> LoRA ---------------------------------------------------------------------------


def test_dora_to_lora_at_full_rank_merges_to_peft_dora(tmp_path):
    """Exact when the rank allows: PEFT merges the LoRA to the weights it merges the DoRA to."""
    from tests.conftest import BASES
    from tests.peft_ref import peft_merged_state_dict

    out = tmp_path / "lora"
    result = run_cli("convert", ADAPTERS / "llama-dora", out, "--to-lora", "--base", BASES / "llama", "--rank", "16", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["dora"]) == 6 and all(m["relative_error"] < 1e-5 for m in report["dora"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is False
    dora = peft_merged_state_dict("llama", BASES / "llama", ADAPTERS / "llama-dora")
    lora = peft_merged_state_dict("llama", BASES / "llama", out)
    for name, tensor in dora.items():
        torch.testing.assert_close(lora[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", [("--rank", "2"), ("--energy", "0.9")])
def test_dora_to_lora_is_the_best_low_rank_approximation(tmp_path, how):
    """Eckart–Young: the error of the LoRA written is the optimum for its rank, from PEFT's own ΔW."""
    import numpy as np

    from tests.conftest import BASES
    from tests.peft_ref import load_base, peft_merged_state_dict

    out = tmp_path / "lora"
    result = run_cli("convert", ADAPTERS / "llama-dora", out, "--to-lora", "--base", BASES / "llama", *how, "--json")
    assert result.returncode == 0, result.stderr
    modules = {m["name"]: m for m in json.loads(result.stdout)["dora"]}
    base = {k: v.detach() for k, v in load_base("llama", BASES / "llama").state_dict().items()}
    dora = peft_merged_state_dict("llama", BASES / "llama", ADAPTERS / "llama-dora")
    lora = peft_merged_state_dict("llama", BASES / "llama", out)
    for path, m in modules.items():
        delta = (dora[path + ".weight"] - base[path + ".weight"]).double().numpy()
        sigma = np.linalg.svd(delta, compute_uv=False)
        k = m["rank"]
        optimum = np.sqrt((sigma[k:] ** 2).sum() / (sigma ** 2).sum())
        got = (lora[path + ".weight"] - base[path + ".weight"]).double().numpy()
        assert np.linalg.norm(delta - got) / np.linalg.norm(delta) == pytest.approx(optimum, rel=1e-3, abs=1e-6)
        assert m["relative_error"] == pytest.approx(optimum, rel=1e-3, abs=1e-6)
        if how[0] == "--energy":
            kept = (sigma[:k] ** 2).sum() / (sigma ** 2).sum()
            assert kept >= 0.9 * (1 - 1e-9) and (k == 1 or (sigma[: k - 1] ** 2).sum() / (sigma ** 2).sum() < 0.9)
        else:
            assert k == 2


def test_dora_to_lora_needs_the_base(tmp_path):
    assert_clean_error(run_cli("convert", ADAPTERS / "llama-dora", tmp_path / "o", "--to-lora"), "give --base", code=2)
    from tests.conftest import BASES

    assert_clean_error(run_cli("convert", ADAPTERS / "llama-dora", tmp_path / "o", "--to-lora", "--base", BASES / "llama"),
                       "exactly one of --rank", code=2)
    assert_clean_error(run_cli("convert", ADAPTERS / "llama-basic", tmp_path / "o", "--to-lora", "--rank", "2"),
                       "for DoRA adapters", code=2)
    assert not (tmp_path / "o").exists()
