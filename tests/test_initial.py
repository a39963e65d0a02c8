"""PiSSA / OLoRA adapters (trained on a base PEFT rewrote) as LoRA on the original base, given
the initial adapter: against PEFT's own conversion (path_initial_model_for_weight_conversion)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import assert_clean_error, run_cli
from tests.peft_ref import peft_merged_state_dict
from tests.tiny_models import build_base


@pytest.fixture(scope="module", params=["pissa", "olora"])
def trained(request, tmp_path_factory):
    """(original base dir, trained adapter, initial adapter, PEFT's converted adapter)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp(request.param)
    model = build_base("llama")
    model.save_pretrained(root / "base")  # the original W, before PEFT rewrites it
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=request.param,
                                            target_modules=["q_proj", "v_proj", "down_proj"]))
    peft.peft_config["default"].init_lora_weights = True  # as PEFT's docs save the initial adapter
    peft.save_pretrained(root / "initial")
    peft.peft_config["default"].init_lora_weights = request.param
    torch.manual_seed(3)
    with torch.no_grad():  # "training"
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.05)
    peft.save_pretrained(root / "trained")
    peft.save_pretrained(root / "peft-converted", path_initial_model_for_weight_conversion=str(root / "initial"))
    return root / "base", root / "trained", root / "initial", root / "peft-converted"


def test_validate_warns_and_merge_refuses_without_initial(trained, tmp_path):
    base, adapter, _, _ = trained
    result = run_cli("validate", adapter, "--json")
    findings = json.loads(result.stdout)["results"][0]["findings"]
    assert result.returncode == 0 and [f["code"] for f in findings] == ["needs-initial"]
    assert findings[0]["severity"] == "warning"
    assert_clean_error(run_cli("merge", base, adapter, tmp_path / "out"), "--initial DIR")
    assert not (tmp_path / "out").exists()


def test_merge_with_initial_equals_peft_conversion(trained, tmp_path):
    base, adapter, initial, converted = trained
    result = run_cli("merge", base, adapter, tmp_path / "out", "--initial", initial)
    assert result.returncode == 0, result.stderr
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    reference = peft_merged_state_dict("llama", base, converted)
    assert ours.keys() <= reference.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6)


def test_convert_with_initial_has_peft_conversions_delta(trained, tmp_path):
    from tests.peft_ref import peft_model

    base, adapter, initial, converted = trained
    out = tmp_path / "lora"
    result = run_cli("convert", adapter, out, "--to-lora", "--initial", initial)
    assert result.returncode == 0, result.stderr
    ours, theirs = peft_model("llama", out), peft_model("llama", converted)
    layers = dict(theirs.named_modules())
    checked = 0
    for name, module in ours.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "r", {}):
            assert module.r["default"] == 8  # [A; A0]: the rank doubles
            torch.testing.assert_close(module.get_delta_weight("default"), layers[name].get_delta_weight("default"),
                                       rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == 6
    assert run_cli("validate", out).returncode == 0


def test_initial_must_be_the_adapters_own(trained, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, adapter, _, _ = trained
    get_peft_model(build_base("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"])).save_pretrained(tmp_path / "other")
    assert_clean_error(run_cli("merge", base, adapter, tmp_path / "out", "--initial", tmp_path / "other"), "not its initial adapter")
    assert_clean_error(run_cli("convert", adapter, tmp_path / "o", "--to-lora", "--initial", tmp_path / "other"), "not its initial adapter")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()
