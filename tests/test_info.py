"""`loratools info`: what it reports, checked against PEFT, and what it must not import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ADAPTERS, LORATOOLS, run_cli

TOP_LEVEL_KEYS = {
    "schema_version", "adapter", "architecture", "architecture_note", "head", "peft_type", "base_model_name_or_path",
    "r", "lora_alpha", "scaling", "use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "bias", "rank_pattern",
    "alpha_pattern", "target_modules", "roles", "num_modules", "trainable_parameters", "total_parameters", "dtypes",
    "file", "modules", "extras", "unknown_keys", "family_known", "naming", "trainable_tokens", "variants", "refusals",
    "variant_keys", "pruned_modules", "experts",
}
MODULE_KEYS = {"name", "role", "layer", "layout", "weight_shape", "rank", "alpha", "scaling", "dora", "lora_bias", "kasa", "moe"}


def info_json(name: str) -> dict:
    result = run_cli("info", "--json", ADAPTERS / name)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_json_schema_is_stable(fixture_adapter):
    name, _, base = fixture_adapter
    info = info_json(name)
    assert set(info) == TOP_LEVEL_KEYS
    assert info["architecture"] == base and info["peft_type"] == "LORA"
    for module in info["modules"]:
        assert set(module) == MODULE_KEYS


def test_counts_agree_with_peft(fixture_adapter):
    """Module count, per-module base weight shapes and trainable parameters as PEFT sees them."""
    from peft import PeftModel

    from tests.tiny_models import build_base

    name, adapter_dir, base = fixture_adapter
    info = info_json(name)
    model = PeftModel.from_pretrained(build_base(base), str(adapter_dir), is_trainable=True)
    lora_layers = {n: m for n, m in model.base_model.model.named_modules() if "default" in getattr(m, "r", {})}
    assert info["num_modules"] == len(lora_layers)
    for module in info["modules"]:
        assert list(lora_layers[module["name"]].get_base_layer().weight.shape) == module["weight_shape"]
    trainable, _ = model.get_nb_trainable_parameters()
    assert info["trainable_parameters"] == trainable


def test_gpt2_roles_and_layouts():
    info = info_json("gpt2-conv1d")
    by_name = {m["name"]: m for m in info["modules"]}
    assert by_name["transformer.h.0.attn.c_attn"]["role"] == "attn_qkv"
    assert by_name["transformer.h.0.attn.c_proj"]["role"] == "attn_out"
    assert by_name["transformer.h.0.mlp.c_proj"]["role"] == "ffn_down"
    assert {m["layout"] for m in info["modules"]} == {"conv1d"}
    # Conv1D weights are (in, out): c_fc maps 16 -> 64.
    assert by_name["transformer.h.0.mlp.c_fc"]["weight_shape"] == [16, 64]
    assert info["fan_in_fan_out"] is True and info["head"] == "causal-lm"


def test_patterns_are_reported_per_module():
    info = info_json("llama-rslora-patterns")
    by_name = {m["name"]: m for m in info["modules"]}
    assert info["use_rslora"] and info["scaling"] == pytest.approx(8 / 2)
    assert (by_name["model.layers.1.mlp.down_proj"]["rank"], by_name["model.layers.1.mlp.down_proj"]["alpha"]) == (6, 12)
    assert by_name["model.layers.1.mlp.down_proj"]["scaling"] == pytest.approx(12 / 6**0.5)
    assert (by_name["model.layers.0.self_attn.q_proj"]["rank"], by_name["model.layers.0.self_attn.q_proj"]["alpha"]) == (4, 3)
    text = run_cli("info", ADAPTERS / "llama-rslora-patterns").stdout
    assert "rsLoRA" in text and "model.layers.1.mlp.down_proj" in text and "r=6" in text


def test_extras_are_classified():
    bert = info_json("bert-modules-to-save")
    kinds = {(e["kind"], e["replaces"]) for e in bert["extras"]}
    assert ("modules_to_save", "classifier.weight") in kinds and ("modules_to_save", "classifier.bias") in kinds
    assert ("base_bias", "bert.encoder.layer.0.attention.self.query.bias") in kinds
    emb = info_json("llama-embedding")
    assert [(e["kind"], e["replaces"]) for e in emb["extras"]] == [("full_embedding", "model.embed_tokens.weight")]
    token = [m for m in emb["modules"] if m["role"] == "token_embed"]
    assert token and token[0]["layout"] == "embedding" and token[0]["weight_shape"] == [64, 16]
    dora = info_json("llama-dora")
    assert dora["use_dora"] and all(m["dora"] for m in dora["modules"])
    bias = info_json("gpt2-lora-bias")
    assert all(m["lora_bias"] for m in bias["modules"])


def test_text_report_names_what_matters():
    result = run_cli("info", ADAPTERS / "bert-modules-to-save")
    assert result.returncode == 0
    for fragment in ("architecture  bert", "modules_to_save", "classifier.weight", "bias lora_only", "query, value"):
        assert fragment in result.stdout


def _imports(*args: str) -> str:
    """Run the installed console script under -X importtime; return the import log."""
    result = subprocess.run([sys.executable, "-X", "importtime", LORATOOLS, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["info", str(ADAPTERS / "llama-dora")],
        ["info", "--json", str(ADAPTERS / "gpt2-conv1d")],
        ["svd", str(ADAPTERS / "llama-rslora-patterns")],  # bf16 factors: widened by numpy
        ["svd", "--json", str(ADAPTERS / "gpt2-conv1d")],
    ],
)
def test_help_info_and_svd_do_not_import_torch(args):
    log = _imports(*args)
    imported = {line.split("|")[-1].strip() for line in log.splitlines() if line.startswith("import time:")}
    assert "loratools.cli" in imported  # the log is real
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and "0.1.0" in result.stdout
