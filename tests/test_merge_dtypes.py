"""The dtype each tensor of OUT is written in, as the plan records it: a float64 base merged in
float64, and --dtype with --keep-quantized on an FP8 base (only the model's plain float tensors
are cast; FP8 weights stay FP8 and their float32 scales stay as stored)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import loratools
from tests.conftest import run_cli
from tests.peft_ref import load_base, outputs, peft_merged_state_dict, peft_model
from tests.quantized_models import fp8_reference_dequant, save_bf16, save_fp8, tiny_causal_lm
from tests.merged import merged_tensors
from tests.tiny_models import build_base


def float64_llama():
    return build_base("llama").to(torch.float64)


@pytest.mark.parametrize("lora", [dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
                                  dict(target_modules=["q_proj", "v_proj"], use_dora=True)])
def test_float64_base_merges_in_float64(tmp_path, lora):
    """PEFT on a float64 model keeps float64 throughout (its adapter weights too): OUT equals its
    merge to float64 round-off, not float32's (3e-8 before), and computes what its model computes."""
    from peft import LoraConfig, get_peft_model

    float64_llama().save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(3)
    model = get_peft_model(float64_llama(), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **lora))
    model.save_pretrained(str(tmp_path / "adapter"))
    adapter = loratools.load_adapter(tmp_path / "adapter")
    assert {adapter.tensors.meta(m.a_key).dtype for m in adapter.modules.values()} == {"float64"}
    loratools.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    ours, base = merged_tensors(tmp_path / "out"), merged_tensors(tmp_path / "base")
    reference = peft_merged_state_dict("llama", tmp_path / "base", tmp_path / "adapter", torch.float64)
    changed = 0
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float64, name
        torch.testing.assert_close(tensor, reference[name], rtol=1e-12, atol=1e-12, msg=name)
        changed += not torch.equal(tensor, base[name])
    assert changed >= 4
    merged = load_base("llama", tmp_path / "out", torch.float64)
    torch.testing.assert_close(outputs(merged, "llama"), outputs(peft_model(float64_llama, tmp_path / "adapter"), "llama"),
                               rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def fp8_q_proj(tmp_path_factory):
    """A bf16 tiny LLaMA stored as FP8 (32x32 blocks), and a LoRA on q_proj only: the other FP8
    weights stay untouched."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("fp8")
    base8 = save_fp8(save_bf16("llama", root / "base16"), root / "base8", block=[32, 32])
    torch.manual_seed(5)
    model = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(root / "lora")
    deltas = {name.removeprefix("base_model.model.") + ".weight": m.get_delta_weight("default").float()
              for name, m in model.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")}
    return base8, root / "lora", deltas


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_keep_quantized_with_dtype_casts_only_plain_floats(fp8_q_proj, tmp_path, dtype):
    """--keep-quantized --dtype: norms, embedding and head are cast; an untouched FP8 weight and
    its scales are BASE's bytes; a changed one is FP8 again whose dequantization is within half
    an e4m3 step of dq(W) + PEFT's ΔW; config.json keeps quantization_config and records dtype."""
    base8, lora, deltas = fp8_q_proj
    result = run_cli("merge", base8, lora, tmp_path / "out", "--keep-quantized", "--dtype", dtype, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    stored, merged = load_file(str(base8 / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(merged) == set(stored) and report["tensors"] == len(stored)
    quantized = {n.removesuffix("_scale_inv") for n in stored if n.endswith("_scale_inv")}
    cast = getattr(torch, dtype)
    for name, tensor in merged.items():
        weight = name.removesuffix("_scale_inv")
        if weight in quantized and weight not in deltas:  # untouched: codes and scales as stored
            assert tensor.dtype == stored[name].dtype and torch.equal(tensor.view(torch.uint8), stored[name].view(torch.uint8)), name
        elif weight in deltas:  # changed: FP8 codes and float32 scales again (values checked below)
            assert tensor.dtype == stored[name].dtype and tensor.shape == stored[name].shape, name
        else:
            assert tensor.dtype == cast and torch.equal(tensor, stored[name].to(cast)), name
    for name, delta in deltas.items():
        want = fp8_reference_dequant(stored[name], stored[name + "_scale_inv"], [32, 32]) + delta
        got = fp8_reference_dequant(merged[name], merged[name + "_scale_inv"], [32, 32])
        step = merged[name + "_scale_inv"].repeat_interleave(32, 0).repeat_interleave(32, 1)[: want.shape[0], : want.shape[1]]
        assert ((got - want).abs() <= 32 * step * 0.5 + 1e-7).all(), name  # half an e4m3 step at 448 = 32 units of scale
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8" and config["dtype"] == dtype


def test_plan_records_every_output_dtype(fp8_q_proj):
    """The plan says what each output tensor is written as; the executor writes exactly that."""
    from loratools.formats.checkpoint import open_checkpoint
    from loratools.ops.merge import plan_merge

    base8, lora, deltas = fp8_q_proj
    base = open_checkpoint(base8)
    kept = plan_merge(base, loratools.load_adapter(lora), dtype="float16", keep_quantized=True)
    dtypes = {out.name: out.dtype for outputs in kept.outputs.values() for out in outputs}
    assert {dtypes[n] for n in base.quantized} == {"F8_E4M3"} and {dtypes[n] for n in base.quant_parts} == {"F32"}
    assert {d for n, d in dtypes.items() if n not in base.quantized and n not in base.quant_parts} == {"F16"}
    dequantized = plan_merge(base, loratools.load_adapter(lora))
    dtypes = {out.name: out.dtype for outputs in dequantized.outputs.values() for out in outputs}
    assert set(dtypes) == set(base.weight_map) - base.quant_parts and set(dtypes.values()) == {"BF16"}
