"""MoE adapters end to end: LoRA on transformers 5's fused expert parameters (PEFT's
target_parameters) and per-expert (transformers 4) LoRA, merged into checkpoints as transformers
saves them, checked against PEFT's merge_and_unload saved by transformers and against the PEFT
model's logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from tests.conftest import assert_clean_error, run_cli
from tests.merged import merged_tensors

DIMS = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            num_experts_per_tok=2, max_position_embeddings=64)
FAMILIES = {  # model_type -> its config's own names for the expert count and size
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=24, intermediate_size=40),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=24, intermediate_size=40, shared_expert_intermediate_size=16),
    "mixtral": dict(num_local_experts=4, intermediate_size=24),
    # stored fused, (E, in, out), gate/up interleaved: ΔW goes into each expert's slice, transposed
    "gpt_oss": dict(num_local_experts=4, intermediate_size=24),
}
PER_EXPERT_ON_DISK = ("qwen3_moe", "qwen2_moe", "mixtral")
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **DIMS, **FAMILIES[model_type])
    return AutoModelForCausalLM.from_config(config).eval()


def make_adapter(model_type: str, path, target_parameters=EXPERTS, target_modules=("q_proj", "v_proj"), seed=1, r=2,
                 lora_alpha=6, **extra):
    """A PEFT adapter on a fresh base, every factor random (fixed seed): B is zero at init."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules),
                        target_parameters=list(target_parameters), **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(build(model_type), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(str(path))
    return model


def logits(model) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    build(model_type).save_pretrained(str(root / "base"))
    return model_type, root


def peft_reference(model_type, base, adapter, out, run=True):
    """transformers from_pretrained -> PeftModel -> (logits) -> merge_and_unload -> save_pretrained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).eval()
        expected = logits(model) if run else None
        model.merge_and_unload().save_pretrained(str(out))
    return expected


def assert_merge_is_peft(model_type, root, adapter, name, run=True):
    """OUT equals PEFT's merged model as transformers saves it, and (run) transformers loads OUT
    with the PEFT model's logits."""
    from transformers import AutoModelForCausalLM

    out, ref = root / f"out-{name}", root / f"ref-{name}"
    result = run_cli("merge", root / "base", adapter, out)
    assert result.returncode == 0, result.stderr
    expected = peft_reference(model_type, root / "base", adapter, ref, run)
    ours, theirs = merged_tensors(out), merged_tensors(ref)
    assert set(ours) == set(theirs)
    base = merged_tensors(root / "base")
    changed = [k for k in ours if not torch.equal(ours[k], base[k])]
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-6, msg=key)
    if not run:
        return changed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-4, atol=1e-5)
    return changed


def test_fused_experts_merge_equals_peft(family):
    model_type, root = family
    make_adapter(model_type, root / "fused")
    changed = assert_merge_is_peft(model_type, root, root / "fused", "fused")
    # in both layers q, v and every expert's gate, up and down (gpt_oss: the two fused tensors)
    assert len(changed) == 2 * (2 + (2 if model_type == "gpt_oss" else 4 * 3)), changed


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_fused_experts_through_torch(model_type, tmp_path):
    """A float64 base is merged by the torch kernel (in float64, as PEFT merges it): the same
    placement, including a tensor that stores all experts. (transformers' experts do not run in
    float64: the check is PEFT's merged weights.)"""
    root = tmp_path
    build(model_type).double().save_pretrained(str(root / "base"))
    make_adapter(model_type, root / "fused")
    plan = json.loads(run_cli("merge", root / "base", root / "fused", root / "x", "--dry-run", "--json").stdout)
    merged = [t for tensors in plan["shards"].values() for t in tensors if t["action"] == "merge"]
    assert merged and {t["kernel"] for t in merged} == {"torch"}
    experts = [t for t in merged if ".experts." in t["name"]]
    assert all(any("lora_A.weight[" in f for f in t["feeds"]) for t in experts)
    changed = assert_merge_is_peft(model_type, root, root / "fused", "f64", run=False)
    assert len(changed) == 2 * (2 + (2 if model_type == "gpt_oss" else 4 * 3))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe"])
def test_one_fused_parameter_and_the_router(model_type, tmp_path):
    """down_proj alone (saved without the base_layer nesting), plus the router: in transformers 5 a
    TopKRouter, not an nn.Linear, so PEFT targets its 2-D weight as a parameter; ΔW = s·B@A as for a
    Linear. (Mixtral's router is stored as block_sparse_moe.gate: the key-rename table places it.)"""
    root = tmp_path
    build(model_type).save_pretrained(str(root / "base"))
    make_adapter(model_type, root / "down", target_parameters=["mlp.experts.down_proj", "mlp.gate.weight"], target_modules=[])
    changed = assert_merge_is_peft(model_type, root, root / "down", "down")
    assert sum(".gate.weight" in k for k in changed) == 2 and sum("down_proj" in k for k in changed) == 2 * 4


def test_info_describes_experts(family):
    model_type, root = family
    if not (root / "fused").exists():
        make_adapter(model_type, root / "fused")
    result = run_cli("info", root / "fused", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    experts = doc["experts"]
    assert [(e["name"], e["experts"], e["rank"], e["layout"]) for e in experts[:2]] == [
        ("model.layers.0.mlp.experts.down_proj", 4, 2, "fused experts (v5)"),
        ("model.layers.0.mlp.experts.gate_up_proj", 4, 2, "fused experts (v5)"),
    ]
    text = run_cli("info", root / "fused").stdout
    assert "4 fused experts" in text and "rank-mismatch" not in text


def test_validate_checks_experts_against_the_base(family, tmp_path):
    model_type, root = family
    if not (root / "fused").exists():
        make_adapter(model_type, root / "fused")
    result = run_cli("validate", root / "fused", "--base", root / "base")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank-mismatch" not in result.stdout
    served = run_cli("validate", root / "fused", "--target", "vllm", "--strict")
    # vLLM reads fused experts LoRA only for models it holds 3-D (gpt_oss); the rest: refused
    # (tests/test_moe_serving.py has the rules)
    assert (served.returncode == 0) == (model_type == "gpt_oss"), served.stdout
    assert (model_type == "gpt_oss") != ("vllm-experts" in served.stdout), served.stdout
    # a base with other expert sizes: the shape through the mapping is reported, with a stable code
    from transformers import AutoConfig, AutoModelForCausalLM

    dims = {**FAMILIES[model_type]}
    key = "moe_intermediate_size" if "moe_intermediate_size" in dims else "intermediate_size"
    dims[key] = 16
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **DIMS, **dims)).save_pretrained(str(tmp_path / "other"))
    result = run_cli("validate", root / "fused", "--base", tmp_path / "other")
    assert result.returncode != 0 and "base-shape" in result.stdout, result.stdout


def test_convert_to_lora_folds_the_experts_scaling(tmp_path):
    """convert --to-lora on fused experts: s folded into B (every expert's columns), alpha = r; PEFT
    loads the result as the same model, and merge gives the same weights."""
    from peft import PeftModel

    model_type = "qwen3_moe"
    build(model_type).save_pretrained(str(tmp_path / "base"))
    make_adapter(model_type, tmp_path / "ad", use_rslora=True)
    result = run_cli("convert", tmp_path / "ad", tmp_path / "plain", "--to-lora")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2 and not config["use_rslora"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = logits(PeftModel.from_pretrained(build(model_type), str(tmp_path / "ad")).eval())
        after = logits(PeftModel.from_pretrained(build(model_type), str(tmp_path / "plain")).eval())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    for name in ("ad", "plain"):
        assert run_cli("merge", tmp_path / "base", tmp_path / name, tmp_path / f"out-{name}").returncode == 0
    ours, theirs = merged_tensors(tmp_path / "out-plain"), merged_tensors(tmp_path / "out-ad")
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_resize_truncates_each_expert(model_type, tmp_path):
    """resize --rank 1 on fused experts: every expert's ΔW_e becomes its best rank-1 approximation
    (PEFT loads the result; its get_delta_weight per expert is the truncated SVD of the original's)."""
    from peft import PeftModel

    model = make_adapter(model_type, tmp_path / "ad", target_modules=["q_proj"])
    result = run_cli("resize", tmp_path / "ad", tmp_path / "small", "--rank", "1")
    assert result.returncode == 0, result.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = PeftModel.from_pretrained(build(model_type), str(tmp_path / "small"))
    for layer in range(2):
        old, new = (m.base_model.model.model.layers[layer].mlp.experts for m in (model, small))
        for wrapper_old, wrapper_new in ((old, new), (old.base_layer, new.base_layer)):
            before, after = wrapper_old.get_delta_weight("default"), wrapper_new.get_delta_weight("default")
            for e in range(4):
                u, sv, vh = torch.linalg.svd(before[e].double())
                torch.testing.assert_close(after[e].double(), sv[0] * torch.outer(u[:, 0], vh[0]), rtol=1e-4, atol=1e-5)


def test_convert_to_a_scheme_refuses_fused_experts(family, tmp_path):
    """One line naming what is unsupported, no output written."""
    model_type, root = family
    if not (root / "fused").exists():
        make_adapter(model_type, root / "fused")
    out = tmp_path / "out"
    assert_clean_error(run_cli("convert", root / "fused", out, "--to", "llama"), "fused MoE expert")
    assert not out.exists()


def test_per_expert_v4_adapter_merges(family):
    """A transformers 4 adapter names each expert's Linear (as checkpoints do). transformers 5 has no
    such modules, so it is built from the definition: every on-disk expert weight gets s·B@A.
    (gpt_oss never had per-expert modules.)"""
    from safetensors.torch import save_file

    model_type, root = family
    if model_type not in PER_EXPERT_ON_DISK:
        pytest.skip("gpt_oss checkpoints never had per-expert tensors")
    base = merged_tensors(root / "base")
    experts = sorted(k for k in base if ".experts.0." in k and k.endswith(".weight"))
    assert experts, sorted(base)[:10]
    gen = torch.Generator().manual_seed(3)
    tensors, expected = {}, {}
    r, alpha = 2, 4
    for key in experts:
        module = key[: -len(".weight")]
        out_f, in_f = base[key].shape
        a, b = torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)
        tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"] = a, b
        expected[key] = base[key] + (alpha / r) * (b @ a)
    leaves = sorted({k.split(".experts.0.")[1].split(".")[0] for k in experts})
    adapter = root / "v4"
    adapter.mkdir(exist_ok=True)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": leaves, "task_type": "CAUSAL_LM",
    }))
    out = root / "out-v4"
    result = run_cli("merge", root / "base", adapter, out)
    assert result.returncode == 0, result.stderr
    merged = merged_tensors(out)
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected.get(key, base[key]), rtol=1e-6, atol=1e-6, msg=key)
    info = json.loads(run_cli("info", adapter, "--json").stdout)
    assert {m["moe"] for m in info["modules"]} == {"per-expert (v4)"}


def test_without_a_model_type_merge_refuses(tmp_path):
    """The experts' placement is the family's: a base without config.json is refused, one line."""
    import shutil

    model_type = "qwen3_moe"
    build(model_type).save_pretrained(str(tmp_path / "base"))
    make_adapter(model_type, tmp_path / "ad")
    (tmp_path / "base" / "config.json").unlink()
    result = run_cli("merge", tmp_path / "base", tmp_path / "ad", tmp_path / "out")
    assert_clean_error(result, "fused MoE experts")
    shutil.rmtree(tmp_path / "base")


def test_svd_per_expert_is_peft_delta(tmp_path):
    """svd gives one row per expert with the singular values of PEFT's own ΔW_e (get_delta_weight),
    and summarises each expert role over the experts."""
    model_type = "qwen3_moe"
    model = make_adapter(model_type, tmp_path / "ad", target_modules=["q_proj"])
    report = json.loads(run_cli("svd", tmp_path / "ad", "--json").stdout)
    rows = {m["name"]: m for m in report["modules"]}
    wrapper = model.base_model.model.model.layers[1].mlp.experts  # PEFT's outer wrapper: down_proj
    for parameter, layer in (("down_proj", wrapper), ("gate_up_proj", wrapper.base_layer)):
        delta = layer.get_delta_weight("default").double()
        for e in range(4):
            row = rows[f"model.layers.1.mlp.experts.{parameter}[{e}]"]
            assert row["expert"] == e and row["rank"] == 2
            expected = torch.linalg.svdvals(delta[e])[:2].tolist()
            assert row["singular_values"] == pytest.approx(expected, rel=1e-5)
    assert report["summary"]["by_role"]["expert_down"]["modules"] == 2 * 4
    assert report["summary"]["by_role"]["expert_gate_up"]["modules"] == 2 * 4


def test_fused_expert_factors_that_are_not_r_times_e(tmp_path):
    """A (r·E, in) and B (out, r·E) are checked against the resolved r: a stable code, not the
    plain modules' rank-mismatch."""
    from safetensors.torch import save_file

    key = "base_model.model.model.layers.0.mlp.experts.lora_{}.weight"
    for name, rows in (("good", 8), ("bad", 7)):
        (tmp_path / name).mkdir()
        save_file({key.format("A"): torch.ones(rows, 16), key.format("B"): torch.ones(24, rows)},
                  str(tmp_path / name / "adapter_model.safetensors"))
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": [],
            "target_parameters": ["mlp.experts.down_proj"]}))
    info = json.loads(run_cli("info", tmp_path / "good", "--json").stdout)
    assert [(e["name"], e["experts"], e["rank"]) for e in info["experts"]] == [("model.layers.0.mlp.experts.down_proj", 4, 2)]
    result = run_cli("validate", tmp_path / "bad")
    assert result.returncode == 1 and "expert-rank" in result.stdout and "rank-mismatch" not in result.stdout
    build("qwen3_moe").save_pretrained(str(tmp_path / "base"))
    assert_clean_error(run_cli("merge", tmp_path / "base", tmp_path / "bad", tmp_path / "out"), "for the fused experts")
