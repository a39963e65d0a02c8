"""Adapters PEFT merges that loratools used to refuse (VeLoRA, MonteCLoRA, BD-LoRA, GPT-NeoX's
embed_out, Nemotron-H, Conv2d LoRA): each made by real PEFT on a tiny seeded float32 model and
merged by `loratools merge`, then compared with PEFT's merge_and_unload on the same files — or
refused in one line naming the true reason."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import assert_clean_error, run_cli
from tests.peft_ref import load_base, outputs, peft_model
from tests.test_merge import assert_matches_peft, merged_tensors
from tests.test_real_world import _lora_config, merge_matches_peft, peft_adapter
from tests.tiny_models import build_base


def llama():
    return build_base("llama")


def adapter_tensors(adapter_dir) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def assert_plain_delta(ours: dict, base: dict, adapter_dir, modules: list[str], scaling: float) -> None:
    """Every merged module is W + s·B·A of the saved factors (float32 round-off), so PEFT's merge
    (which `ours` equals) is exactly the plain LoRA of the file."""
    saved = adapter_tensors(adapter_dir)
    for module in modules:
        a = saved[f"base_model.model.{module}.lora_A.weight"]
        b = saved[f"base_model.model.{module}.lora_B.weight"]
        delta = scaling * (b @ a)
        assert delta.abs().max() > 1e-3, module  # the adapter changes the weight
        torch.testing.assert_close(ours[f"{module}.weight"], base[f"{module}.weight"] + delta, rtol=1e-6, atol=1e-6)


# ---- 1. VeLoRA and MonteCLoRA: s·B·A outside a training step -----------------------------------

TRAINING_STATE_VARIANTS = [
    ("velora", lambda: {"velora_config": _lora_config("VeloraConfig", num_groups=4, init_type="random")}, "lora_velora_embed"),
    ("velora", lambda: {"velora_config": _lora_config("VeloraConfig", num_groups=2)}, "lora_velora_embed"),
    ("monteclora", lambda: {"monteclora_config": _lora_config("MontecloraConfig")}, "lora_monteclora_sampler"),
]


@pytest.mark.parametrize("variant,config,own_tensor", TRAINING_STATE_VARIANTS)
def test_training_state_variants_merge_as_peft(tmp_path, variant, config, own_tensor):
    """PEFT merges VeLoRA and MonteCLoRA with get_delta_weight = s·B·A and serves them (eval) as
    plain LoRA; their own tensors (VeLoRA's projection, MonteCLoRA's sampler, here randomised too)
    act only in a training step."""
    base_dir, adapter_dir = peft_adapter(tmp_path, llama, target_modules=["q_proj", "v_proj", "down_proj"], **config())
    assert any(own_tensor in key for key in adapter_tensors(adapter_dir))
    ours, base = merge_matches_peft(tmp_path, base_dir, adapter_dir)
    modules = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert_plain_delta(ours, base, adapter_dir, modules, scaling=2.0)
    # transformers loads OUT and computes what the unmerged PEFT model computes
    torch.testing.assert_close(outputs(load_base("llama", tmp_path / "out"), "llama"),
                               outputs(peft_model(llama, adapter_dir), "llama"), rtol=1e-4, atol=1e-5)

    info = json.loads(run_cli("info", adapter_dir, "--json").stdout)
    assert info["variants"] == [variant] and info["unknown_keys"] == [] and info["refusals"]["merge"] == []
    assert info["variant_keys"] and all(own_tensor in k for k in info["variant_keys"])
    assert run_cli("validate", adapter_dir, "--base", base_dir).returncode == 0
    assert run_cli("svd", adapter_dir).returncode == 0
    assert run_cli("export", adapter_dir, tmp_path / "a.gguf", "--base", base_dir).returncode == 0
    # A rewritten adapter would lose the variant's own tensors: refused with that reason.
    result = run_cli("resize", adapter_dir, tmp_path / "r", "--rank", "1")
    assert_clean_error(result, f"LoRA variant {variant}", "training-only tensors", code=1)
    assert not (tmp_path / "r").exists()
