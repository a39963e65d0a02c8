"""Serving: `validate --target vllm[@VERSION]|sglang|llama.cpp` and `convert --to-lora` (scaling 1 everywhere).

Each runtime rule is tested at the release its source was read from (in the test's name); the
rules and the releases they hold for are in loratools/runtimes/. Nothing here downloads a runtime.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.broken import copy_adapter, edit_config, replace_tensors
from tests.conftest import ADAPTERS, ROOT, assert_clean_error, run_cli
from tests.peft_ref import peft_model
from tests.tiny_models import build_base


def _codes(adapter, target: str) -> dict[str, str]:
    result = run_cli("validate", adapter, "--target", target, "--json")
    findings = json.loads(result.stdout)["results"][0]["findings"]
    assert result.returncode == (1 if any(f["severity"] == "error" for f in findings) else 0)
    return {f["code"]: f["severity"] for f in findings}


def _runtime(adapter, target: str) -> dict[str, str]:
    """The findings of the runtime's own rules (library call: every target form, no subprocess)."""
    from loratools.ops.validate import validate

    prefix = target.split("@")[0].replace(".", "") + "-"
    return {f.code: f.severity for f in validate(adapter, target=target).findings if f.code.startswith(prefix)}


def _messages(adapter, target: str, code: str) -> list[str]:
    from loratools.ops.validate import validate

    return [f.message for f in validate(adapter, target=target).findings if f.code == code]


def _edited(tmp_path, name: str = "llama-basic", **changes):
    adapter = copy_adapter(tmp_path, name)
    edit_config(adapter, lambda c: {**c, **changes})
    return adapter


def _peft(tmp_path, name: str = "a", family: str = "llama", **lora):
    from peft import LoraConfig, get_peft_model

    get_peft_model(build_base(family), LoraConfig(**lora)).save_pretrained(tmp_path / name)
    return tmp_path / name


# ---- vLLM 0.33.0 (the newest release read; `--target vllm`) ----------------------------------


@pytest.mark.parametrize("adapter,expected", [
    ("llama-basic", {}),
    ("llama-dora", {"vllm-dora": "error"}),
    ("llama-rslora-patterns", {}),  # patterns honoured since 0.32.0
    ("bert-modules-to-save", {"vllm-bias": "error"}),  # a classifier head is accepted since 0.31.0; bias is not
    ("gpt2-lora-bias", {"vllm-tensor": "error"}),
    ("llama-embedding", {"vllm-embedding": "warning", "vllm-saved-embedding": "warning"}),
])
def test_vllm_0_33_verdicts(adapter, expected):
    codes = {c: s for c, s in _codes(ADAPTERS / adapter, "vllm").items() if c.startswith("vllm-")}
    assert codes == expected
    assert _runtime(ADAPTERS / adapter, "vllm@0.33.0") == expected


def test_vllm_0_32_honours_rank_pattern():
    for target in ("vllm@0.32.0", "vllm@0.33.0", "vllm"):
        assert "vllm-scaling" not in _runtime(ADAPTERS / "llama-rslora-patterns", target)


def test_vllm_before_0_32_ignores_rank_pattern(tmp_path):
    for target in ("vllm@0.31.0", "vllm@0.10.0"):
        assert _runtime(ADAPTERS / "llama-rslora-patterns", target) == {"vllm-scaling": "error"}
    (message,) = _messages(ADAPTERS / "llama-rslora-patterns", "vllm@0.31.0", "vllm-scaling")
    assert message.startswith("vLLM 0.31.0 ignores rank_pattern") and "convert ADAPTER OUT --to-lora" in message
    # the fix it names: every module at scaling 1 is served as PEFT serves it, whatever the patterns
    out = tmp_path / "plain"
    assert run_cli("convert", ADAPTERS / "llama-rslora-patterns", out, "--to-lora").returncode == 0
    assert _runtime(out, "vllm@0.31.0") == {}


def test_vllm_0_32_sizes_max_lora_rank_by_rank_pattern(tmp_path):
    """validate_legal (0.32.0): max(r, *rank_pattern.values()), a value that matches no module
    included; before, r was checked and a larger module failed its slot."""
    wide = _peft(tmp_path, "wide", r=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 40})
    assert _runtime(wide, "vllm") == {"vllm-rank": "warning"}
    assert "--max-lora-rank 64" in _messages(wide, "vllm", "vllm-rank")[0]
    assert _runtime(wide, "vllm@0.31.0") == {"vllm-rank": "warning", "vllm-scaling": "error"}
    unused = _edited(tmp_path, rank_pattern={"nowhere_proj": 64})
    assert _runtime(unused, "vllm@0.32.0") == {"vllm-rank": "warning"}
    assert _runtime(unused, "vllm@0.31.0") == {}


def test_vllm_rank_needs_a_larger_max_lora_rank(tmp_path):
    _peft(tmp_path, r=40, target_modules=["q_proj"])
    result = run_cli("validate", tmp_path / "a", "--target", "vllm")
    assert result.returncode == 0 and "--max-lora-rank 64" in result.stdout  # a warning: it loads with the flag
    assert run_cli("validate", tmp_path / "a", "--target", "vllm", "--strict").returncode == 1


def test_vllm_0_33_refuses_rank_above_512(tmp_path):
    adapter = _edited(tmp_path, rank_pattern={"q_proj": 600})
    assert _runtime(adapter, "vllm") == {"vllm-rank": "error"}
    assert "loratools resize ADAPTER OUT --rank 512" in _messages(adapter, "vllm", "vllm-rank")[0]


@pytest.mark.parametrize("init,refused", [
    ("pissa", True), ("pissa_niter_4", True), ("olora", True), ("corda", True), ("loftq", True),
    ("gaussian", False), ("lora_ga", False), ("eva", False), (True, False), (False, False),
])
def test_vllm_0_32_refuses_base_modifying_init(tmp_path, init, refused):
    adapter = _edited(tmp_path, init_lora_weights=init)
    assert _runtime(adapter, "vllm@0.32.0") == ({"vllm-init": "error"} if refused else {})
    if refused:
        assert "--to-lora --initial INITIAL_DIR" in _messages(adapter, "vllm", "vllm-init")[0]


def test_vllm_before_0_32_serves_base_modifying_init_as_trained(tmp_path):
    assert _runtime(_edited(tmp_path, init_lora_weights="pissa"), "vllm@0.31.0") == {"vllm-init": "warning"}


@pytest.mark.parametrize("key,value", [
    ("alora_invocation_tokens", [5, 6]), ("layer_replication", [[0, 2]]), ("use_bdlora", {"nblocks": 2}),
    ("use_qalora", True),
])
def test_vllm_0_32_refuses_peft_features(tmp_path, key, value):
    adapter = _edited(tmp_path, **{key: value})
    assert _runtime(adapter, "vllm@0.32.0") == {"vllm-feature": "error"}
    assert _messages(adapter, "vllm@0.32.0", "vllm-feature")[0].startswith("vLLM 0.32.0 refuses")
    assert _runtime(adapter, "vllm@0.31.0") == {"vllm-feature": "error"}  # not read: served as a plain LoRA
    assert "does not read " + key in _messages(adapter, "vllm@0.31.0", "vllm-feature")[0]


def test_vllm_0_31_accepts_one_classifier_head_as_modules_to_save(tmp_path):
    plain = _edited(tmp_path, "bert-modules-to-save", bias="none")
    replace_tensors(plain, lambda t: {k: v for k, v in t.items() if "base_layer.bias" not in k})
    assert _runtime(plain, "vllm@0.31.0") == {}
    assert _runtime(plain, "vllm@0.30.0") == {"vllm-modules-to-save": "error"}
    other = tmp_path / "other"
    other.mkdir()
    lm_head = _edited(other, modules_to_save=["lm_head"])
    assert _runtime(lm_head, "vllm") == {"vllm-modules-to-save": "error"}
    two = tmp_path / "two"
    two.mkdir()
    two = _edited(two, "bert-modules-to-save", bias="none", modules_to_save=["classifier", "score"])
    replace_tensors(two, lambda t: {**{k: v for k, v in t.items() if "base_layer.bias" not in k},
                                    "base_model.model.score.weight": torch.ones(3, 16)})
    assert _runtime(two, "vllm") == {"vllm-modules-to-save": "error"}
    assert "saves 2 (classifier, score)" in _messages(two, "vllm", "vllm-modules-to-save")[0]


def test_vllm_0_11_1_refuses_bias():
    assert _runtime(ADAPTERS / "bert-modules-to-save", "vllm@0.11.1") == {"vllm-bias": "error",
                                                                           "vllm-modules-to-save": "error"}
    (message,) = _messages(ADAPTERS / "bert-modules-to-save", "vllm@0.11.0", "vllm-bias")
    assert "--enable-lora-bias" in message and "adds the trained biases to the base layer's own" in message


@pytest.mark.parametrize("target,says", [
    ("vllm@0.32.0", "refuses lora_bias"),  # test_vllm_0_32_refuses_lora_bias
    ("vllm@0.31.0", "is dropped"),  # 0.31.0 reads lora_B.bias as a lora_B, which lora_B.weight replaces
    ("vllm@0.30.0", "as an unsupported LoRA weight"),  # 0.11.1 to 0.30: rejected
    ("vllm@0.11.1", "as an unsupported LoRA weight"),
    ("vllm@0.11.0", "adds lora_B.bias unscaled"),  # before 0.11.1: --enable-lora-bias, unscaled
])
def test_vllm_lora_bias_by_release_0_11_1_0_31_0_32(target, says):
    adapter = ADAPTERS / "gpt2-lora-bias"
    assert _runtime(adapter, target) == {"vllm-tensor": "error"}
    assert says in _messages(adapter, target, "vllm-tensor")[0]


def test_vllm_before_0_11_1_serves_lora_bias_at_scaling_1_with_enable_lora_bias(tmp_path):
    plain = tmp_path / "plain"  # scaling 1: the unscaled bias is PEFT's, the flag is all it needs
    assert run_cli("convert", ADAPTERS / "gpt2-lora-bias", plain, "--to-lora").returncode == 0
    assert _runtime(plain, "vllm@0.11.0") == {"vllm-tensor": "warning"}
    assert "--enable-lora-bias" in _messages(plain, "vllm@0.11.0", "vllm-tensor")[0]


def test_vllm_0_12_skips_a_saved_embedding():
    assert _runtime(ADAPTERS / "llama-embedding", "vllm@0.12.0")["vllm-saved-embedding"] == "warning"
    assert _runtime(ADAPTERS / "llama-embedding", "vllm@0.11.2")["vllm-saved-embedding"] == "error"


def test_vllm_0_11_1_accepts_max_lora_rank_1(tmp_path):
    from loratools.ops.serving import serving_set
    from loratools.ops.validate import validate

    _peft(tmp_path, r=1, target_modules=["q_proj"])
    for target, flag in (("vllm@0.11.1", "--max-lora-rank 1"), ("vllm@0.11.0", "--max-lora-rank 8")):
        assert serving_set([validate(tmp_path / "a", target=target).serving])["options"][0] == flag


def _moe(tmp_path, name: str, tensors: dict, **config):
    from safetensors.torch import save_file

    adapter = tmp_path / name
    adapter.mkdir()
    base = json.loads((ADAPTERS / "llama-basic" / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**base, **config}))
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    return adapter


def test_vllm_0_33_accepts_its_moe_formats(tmp_path):
    """2-D per-expert modules (experts.N.gate_proj) and PEFT's fused 3-D experts (target_parameters,
    saved as experts.base_layer / experts): no vLLM rule refuses either."""
    g = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers.0.mlp.experts"
    per_expert = {f"{prefix}.{e}.{p}.lora_{f}.weight": torch.randn(shape, generator=g)
                  for e in range(2) for p, (i, o) in (("gate_proj", (16, 24)), ("down_proj", (24, 16)))
                  for f, shape in (("A", (4, i)), ("B", (o, 4)))}
    assert _runtime(_moe(tmp_path, "per-expert", per_expert, target_modules=["gate_proj", "down_proj"]), "vllm") == {}
    fused = {f"{prefix}.base_layer.lora_A.weight": torch.randn(8, 16, generator=g),
             f"{prefix}.base_layer.lora_B.weight": torch.randn(48, 8, generator=g),
             f"{prefix}.lora_A.weight": torch.randn(8, 24, generator=g), f"{prefix}.lora_B.weight": torch.randn(16, 8, generator=g)}
    assert _runtime(_moe(tmp_path, "fused", fused, target_modules=[],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), "vllm") == {}


# ---- SGLang 0.5.23 ---------------------------------------------------------------------------


@pytest.mark.parametrize("adapter,expected", [
    ("llama-basic", {}),
    ("llama-dora", {"sglang-dora": "error", "sglang-stacked": "error"}),  # up_proj without gate_proj
    ("llama-rslora-patterns", {"sglang-scaling": "error", "sglang-rank": "error"}),
    ("bert-modules-to-save", {"sglang-target-modules": "error", "sglang-bias": "error", "sglang-modules-to-save": "error"}),
    ("gpt2-lora-bias", {"sglang-target-modules": "error", "sglang-tensor": "error"}),
    ("gpt2-conv1d", {"sglang-target-modules": "error"}),
    ("llama-embedding", {"sglang-stacked": "error", "sglang-saved-embedding": "warning"}),  # q_proj without v_proj
])
def test_sglang_0_5_23_verdicts(adapter, expected):
    assert _runtime(ADAPTERS / adapter, "sglang") == expected
    assert _runtime(ADAPTERS / adapter, "sglang@0.5.23") == expected


def test_sglang_0_5_23_scales_every_module_by_alpha_over_r(tmp_path):
    rslora = _edited(tmp_path, use_rslora=True)  # one rank: only the scaling differs from PEFT's
    assert _runtime(rslora, "sglang") == {"sglang-scaling": "error"}
    assert _runtime(rslora, "vllm") == {}
    out = tmp_path / "plain"
    assert run_cli("convert", rslora, out, "--to-lora").returncode == 0
    assert _runtime(out, "sglang") == {}


def test_sglang_0_5_23_needs_q_and_v_proj_together(tmp_path):
    qv = _peft(tmp_path, "qv", r=4, target_modules=["q_proj", "v_proj", "gate_proj"])
    assert _runtime(qv, "sglang") == {}
    for name, modules in (("k", ["k_proj"]), ("q", ["q_proj", "k_proj"]), ("up", ["up_proj"])):
        assert _runtime(_peft(tmp_path, name, r=4, target_modules=modules), "sglang") == {"sglang-stacked": "error"}, name


def test_sglang_0_5_23_refuses_a_regex_target_modules(tmp_path):
    adapter = _edited(tmp_path, target_modules=r".*\.(q_proj|v_proj)")
    assert _runtime(adapter, "sglang")["sglang-target-modules"] == "error"
    assert "'all-linear'" in _messages(adapter, "sglang", "sglang-target-modules")[0]


# ---- llama.cpp (not versioned) ---------------------------------------------------------------


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


# ---- serving a set; the tables ---------------------------------------------------------------


def test_vllm_set_check_gives_the_max_lora_rank_and_modules(tmp_path):
    wide = _peft(tmp_path, r=40, target_modules=["q_proj", "o_proj"])
    adapters = [ADAPTERS / "llama-basic", wide, ADAPTERS / "llama-rslora-patterns"]
    result = run_cli("validate", *adapters, "--target", "vllm", "--json")
    serving = json.loads(result.stdout)["serving"]
    modules = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert serving == {"target": "vllm@0.33.0", "adapters": 3, "rank": 40, "max_lora_rank": 64, "target_modules": modules,
                       "options": ["--max-lora-rank 64", "--lora-target-modules " + " ".join(modules)]}
    text = run_cli("validate", *adapters, "--target", "vllm").stdout
    assert "--max-lora-rank 64 --lora-target-modules down_proj" in text
    assert json.loads(run_cli("validate", *adapters, "--json").stdout)["serving"] is None


def test_set_check_by_release_and_runtime(tmp_path):
    from loratools.ops.serving import serving_set
    from loratools.ops.validate import validate

    adapters = [ADAPTERS / "llama-basic", _peft(tmp_path, r=24, target_modules=["q_proj", "v_proj"])]
    old = serving_set(validate(a, target="vllm@0.18.1").serving for a in adapters)
    assert old["options"] == ["--max-lora-rank 32"]  # --lora-target-modules came in 0.19.0
    sglang = serving_set(validate(a, target="sglang").serving for a in adapters)
    assert sglang["max_lora_rank"] == 24 and sglang["options"][0] == "--max-lora-rank 24"
    assert serving_set(validate(a, target="llama.cpp").serving for a in adapters) is None


@pytest.mark.parametrize("target,fragment", [
    ("vllm@0.9.0", "recorded for 0.10.0 to 0.33.0 only"), ("vllm@0.34.0", "recorded for 0.10.0 to 0.33.0 only"),
    ("vllm@latest", "not a release number"), ("sglang@0.5.22", "recorded for 0.5.23 only"),
    ("llama.cpp@1.0", "takes no version"), ("tgi", "must be one of vllm, vllm@VERSION, sglang, llama.cpp"),
])
def test_target_forms(target, fragment):
    from loratools.errors import UsageError
    from loratools.runtimes import resolve

    with pytest.raises(UsageError, match=re.escape(fragment)):
        resolve(target)
    assert resolve("vllm").name == "vllm@0.33.0" and resolve("sglang").name == "sglang@0.5.23"
    assert resolve("vllm@0.31.0").label == "vLLM 0.31.0" and resolve("llama.cpp").name == "llama.cpp"


def test_rule_tables_are_data_the_readme_documents():
    """Every rule names a check, a source and releases that were read; every code is in the README."""
    from loratools.ops.serving import CHECKS
    from loratools.runtimes import runtimes

    readme = (ROOT / "README.md").read_text()
    for runtime in runtimes().values():
        for rule in runtime.rules:
            assert rule.check in CHECKS and rule.source and rule.severity in ("error", "warning"), rule
            for bound in (rule.since, rule.until):
                assert bound is None or bound in runtime.read, (rule.code, bound)
            assert f"`{rule.code}`" in readme, rule.code
        for option in runtime.options:
            assert option.since is None or option.since in runtime.read, option


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


def test_target_forms_reach_the_command():
    """The CLI passes any --target form to the library: sglang and vllm@VERSION are accepted,
    an unknown runtime is a usage error naming the forms."""
    adapter = ADAPTERS / "llama-basic"
    assert run_cli("validate", adapter, "--target", "sglang").returncode == 0
    assert run_cli("validate", adapter, "--target", "vllm@0.31.0").returncode == 0
    assert_clean_error(run_cli("validate", adapter, "--target", "tgi"), "vllm@VERSION", "sglang", code=2)
