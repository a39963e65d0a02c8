"""Commands that rewrite fused MoE expert adapters (PEFT's target_parameters): combine, convert
--to, extract. Each output is loaded by PEFT itself and its per-expert ΔW_e (PEFT's
get_delta_weight) checked against the definition."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from tests.conftest import assert_clean_error, run_cli
from tests.test_moe import EXPERTS, build, make_adapter

LAYERS, E = 2, 4


def make(model_type, path, seed, r=2, alpha=6, target_parameters=EXPERTS):
    """A PEFT adapter (q_proj and the experts) with random factors (seeded), saved; the PEFT model returned."""
    return make_adapter(model_type, path, target_parameters, ["q_proj"], seed=seed, r=r, lora_alpha=alpha)


def load(model_type, path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(build(model_type), str(path))


def wrappers(model):
    """{(layer, parameter): PEFT's ParamWrapper}: the outer wrapper is down_proj's, its base_layer gate_up_proj's."""
    out = {}
    for layer in range(LAYERS):
        experts = model.base_model.model.model.layers[layer].mlp.experts
        out[(layer, "down_proj")], out[(layer, "gate_up_proj")] = experts, experts.base_layer
    return out


def deltas(model):
    """{(layer, parameter): (E, d1, d2) ΔW} as PEFT computes it."""
    with torch.no_grad():
        return {k: w.get_delta_weight("default").double() for k, w in wrappers(model).items()}


def per_expert_factors(model):
    """{(layer, parameter): (A (E, r, in), B (E, out, r), scaling)}, reshaped as PEFT's ParamWrapper does."""
    out = {}
    for key, w in wrappers(model).items():
        a, b = w.lora_A["default"].weight.detach().double(), w.lora_B["default"].weight.detach().double()
        out[key] = (a.reshape(E, -1, a.shape[-1]), b.reshape(b.shape[0], -1, E).permute(2, 0, 1), w.scaling["default"])
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two qwen3_moe adapters of ranks 2 and 3 (different alphas)."""
    root = tmp_path_factory.mktemp("pair")
    return root, make("qwen3_moe", root / "one", seed=1, r=2, alpha=6), make("qwen3_moe", root / "two", seed=2, r=3, alpha=3)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_combine_cat_sums_each_experts_delta(model_type, tmp_path):
    one, two = make(model_type, tmp_path / "one", seed=1), make(model_type, tmp_path / "two", seed=2, r=3, alpha=3)
    result = run_cli("combine", tmp_path / "one", tmp_path / "two", "--weights", "0.7,-1.5", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(EXPERTS)
    combined = load(model_type, tmp_path / "out")
    assert {w.lora_A["default"].weight.shape[0] for w in wrappers(combined).values()} == {5 * E}  # rank 2 + 3 per expert
    d1, d2, got = deltas(one), deltas(two), deltas(combined)
    for key in got:
        torch.testing.assert_close(got[key], 0.7 * d1[key] + -1.5 * d2[key], rtol=1e-5, atol=1e-6, msg=str(key))


def test_combine_svd_truncates_each_expert_at_one_rank(pair):
    root, one, two = pair
    result = run_cli("combine", root / "one", root / "two", "--method", "svd", "--rank", "1", "--out", root / "svd")
    assert result.returncode == 0, result.stderr
    got, d1, d2 = deltas(load("qwen3_moe", root / "svd")), deltas(one), deltas(two)
    for key in got:
        for e in range(E):
            u, s, vh = torch.linalg.svd(d1[key][e] + d2[key][e])
            torch.testing.assert_close(got[key][e], s[0] * torch.outer(u[:, 0], vh[0]), rtol=1e-4, atol=1e-6)


def test_combine_svd_energy_takes_the_largest_rank_any_expert_needs(pair):
    root, one, two = pair
    result = run_cli("combine", root / "one", root / "two", "--method", "svd", "--energy", "0.999", "--out", root / "energy")
    assert result.returncode == 0, result.stderr
    combined = load("qwen3_moe", root / "energy")
    d1, d2 = deltas(one), deltas(two)
    for key, w in wrappers(combined).items():
        needed = []
        for e in range(E):
            s2 = torch.linalg.svdvals(d1[key][e] + d2[key][e]) ** 2
            needed.append(int((torch.cumsum(s2, 0) / s2.sum() < 0.999).sum()) + 1)
        assert w.lora_A["default"].weight.shape[0] == max(needed) * E, (key, needed)


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_combine_peft_methods_per_expert(tmp_path, method):
    """linear and ties combine each expert's A_e and B_e with weights ±√|w·s| (as PEFT's
    add_weighted_adapter does for a module; PEFT itself refuses target_parameters there)."""
    one, two = make("qwen3_moe", tmp_path / "one", seed=1), make("qwen3_moe", tmp_path / "two", seed=2, alpha=3)
    extra = ["--density", "1.0"] if method == "ties" else []
    result = run_cli("combine", tmp_path / "one", tmp_path / "two", "--method", method, "--weights", "0.5,-2",
                     *extra, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    got = deltas(load("qwen3_moe", tmp_path / "out"))
    f1, f2 = per_expert_factors(one), per_expert_factors(two)
    for key in got:
        (a1, b1, s1), (a2, b2, s2) = f1[key], f2[key]
        wa = torch.tensor([(0.5 * s1) ** 0.5, -((2 * s2) ** 0.5)], dtype=torch.float64)
        wb = wa.abs()

        def merged(t1, t2, w):
            stacked = torch.stack([t1, t2])
            weighted = stacked * w.view(-1, 1, 1, 1)
            if method == "linear":
                return weighted.sum(0)
            signs = stacked.sign()
            majority = signs == torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
            return (weighted * majority).sum(0) / majority.sum(0).clamp(min=1)

        a, b = merged(a1, a2, wa), merged(b1, b2, wb)
        torch.testing.assert_close(got[key], b @ a, rtol=1e-5, atol=1e-6, msg=str(key))


def test_combine_dare_writes_a_loadable_fused_adapter(pair):
    root, _, _ = pair
    make("qwen3_moe", root / "three", seed=3, r=2, alpha=4)
    result = run_cli("combine", root / "one", root / "three", "--method", "dare_linear", "--density", "0.5",
                     "--out", root / "dare")
    assert result.returncode == 0, result.stderr
    assert {w.lora_A["default"].weight.shape for w in wrappers(load("qwen3_moe", root / "dare")).values()} >= {(2 * E, 32)}


def test_combine_refuses_different_expert_parameters(pair, tmp_path):
    root, _, _ = pair
    make("qwen3_moe", tmp_path / "down", seed=4, target_parameters=["mlp.experts.down_proj"])
    result = run_cli("combine", root / "one", tmp_path / "down", "--out", tmp_path / "out")
    assert_clean_error(result, "different fused MoE expert parameters")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["llama", "gpt2"])
def test_convert_to_a_scheme_says_it_has_no_fused_experts(pair, tmp_path, target):
    root, _, _ = pair
    result = run_cli("convert", root / "one", tmp_path / "out", "--to", target)
    assert_clean_error(result, "naming schemes have no fused experts", f"to {target} names")
    assert not (tmp_path / "out").exists()


def fine_tune(model_type, root, seed=5):
    """BASE and a FINETUNED that differs in q_proj and every expert weight (not the router or biases),
    both saved by transformers."""
    model = build(model_type)
    model.save_pretrained(str(root / "base"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj", "q_proj.weight")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(str(root / "ft"))
    return model


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_extract_full_rank_experts_is_the_fine_tune_in_peft(model_type, tmp_path):
    """Per-expert (or gpt_oss fused) checkpoint differences become LoRA on the fused expert
    parameters, which PEFT loads on transformers 5: at full rank the PEFT model is the fine-tune."""
    from transformers import AutoModelForCausalLM

    from tests.test_moe import logits

    tuned = fine_tune(model_type, tmp_path)
    result = run_cli("extract", tmp_path / "base", tmp_path / "ft", tmp_path / "ex", "--rank", "64", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert not report["not_extracted"], report["not_extracted"]
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"model.layers.{i}.mlp.experts.{p}" for i in range(LAYERS)
                                           for p in ("down_proj", "gate_up_proj")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ex")).eval()
    for (layer, parameter), w in wrappers(peft_model).items():
        assert w.parameter_name == parameter and w.lora_A["default"].weight.shape[0] % E == 0
    torch.testing.assert_close(logits(peft_model), logits(tuned.eval()), rtol=1e-4, atol=1e-5)


def test_extract_low_rank_is_each_experts_truncated_svd(tmp_path):
    """--rank 1: PEFT's ΔW_e of every expert is the best rank-1 approximation of its difference
    (gate and up joined, as transformers joins them into gate_up_proj)."""
    from safetensors.torch import load_file

    fine_tune("qwen3_moe", tmp_path)
    assert run_cli("extract", tmp_path / "base", tmp_path / "ft", tmp_path / "ex", "--rank", "1", "--exact").returncode == 0
    base, ft = (load_file(str(tmp_path / side / "model.safetensors")) for side in ("base", "ft"))
    got = deltas(load("qwen3_moe", tmp_path / "ex"))
    for (layer, parameter), delta in got.items():
        for e in range(E):
            name = f"model.layers.{layer}.mlp.experts.{e}."
            parts = ["gate_proj", "up_proj"] if parameter == "gate_up_proj" else ["down_proj"]
            d = torch.cat([(ft[f"{name}{p}.weight"] - base[f"{name}{p}.weight"]).double() for p in parts])
            u, s, vh = torch.linalg.svd(d)
            torch.testing.assert_close(delta[e], s[0] * torch.outer(u[:, 0], vh[0]), rtol=1e-4, atol=1e-6)


def test_extract_energy_pads_experts_to_one_rank(tmp_path):
    """--energy: one rank per parameter, the largest any expert needs; each expert's own part is
    its rank-k_e approximation (the rest zero)."""
    fine_tune("qwen3_moe", tmp_path)
    result = run_cli("extract", tmp_path / "base", tmp_path / "ft", tmp_path / "ex", "--energy", "0.9", "--json")
    assert result.returncode == 0, result.stderr
    rows = {m["name"]: m for m in json.loads(result.stdout)["modules"]}
    for (layer, parameter), w in wrappers(load("qwen3_moe", tmp_path / "ex")).items():
        k = w.lora_A["default"].weight.shape[0] // E
        experts = [rows[f"model.layers.{layer}.mlp.experts.{parameter}[{e}]"] for e in range(E)]
        assert {m["rank"] for m in experts} == {k} and min(m["retained_energy"] for m in experts) >= 0.9


def test_extract_modules_chooses_expert_parameters(tmp_path):
    """--modules expert_down: only down_proj's experts; gate/up are reported as not in --modules."""
    fine_tune("qwen3_moe", tmp_path)
    result = run_cli("extract", tmp_path / "base", tmp_path / "ft", tmp_path / "ex", "--rank", "2", "--modules",
                     "expert_down", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {m["name"].split("[")[0] for m in report["modules"]} == {f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)}
    assert report["summary"]["lora_parameters"] == 2 * E * 2 * (32 + 24)  # the fused factors written, rank 2
    assert report["not_extracted"]["model.layers.0.mlp.experts.3.up_proj.weight"] == "changed, not in --modules"
    config = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]
    model = load("qwen3_moe", tmp_path / "ex")
    assert model.base_model.model.model.layers[0].mlp.experts.lora_A["default"].weight.shape == (2 * E, 24)


def test_extract_one_changed_expert(tmp_path):
    """Only expert 2 of one layer's down_proj changed: the other experts get zero factors, the one
    parameter alone is saved as `experts.lora_A`, and merge gives FINETUNED back."""
    from safetensors.torch import load_file

    model = build("qwen3_moe")
    model.save_pretrained(str(tmp_path / "base"))
    with torch.no_grad():
        p = model.model.layers[1].mlp.experts.down_proj
        p[2].add_(torch.randn(p[2].shape, generator=torch.Generator().manual_seed(7)) * 0.01)
    model.save_pretrained(str(tmp_path / "ft"))
    result = run_cli("extract", tmp_path / "base", tmp_path / "ft", tmp_path / "ex", "--rank", "64", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["modules"]
    assert [m["name"] for m in rows] == [f"model.layers.1.mlp.experts.down_proj[{e}]" for e in range(E)]
    saved = load_file(str(tmp_path / "ex" / "adapter_model.safetensors"))
    assert sorted(saved) == ["base_model.model.model.layers.1.mlp.experts.lora_A.weight",
                             "base_model.model.model.layers.1.mlp.experts.lora_B.weight"]
    assert run_cli("merge", tmp_path / "base", tmp_path / "ex", tmp_path / "merged").returncode == 0
    merged, tuned = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("merged", "ft"))
    for key in tuned:
        torch.testing.assert_close(merged[key], tuned[key], rtol=1e-5, atol=1e-6, msg=key)
