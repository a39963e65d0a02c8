"""`loratools combine`: exact methods against the dense sum, PEFT's methods against add_weighted_adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import loratools
from loratools.ops.combine import combine_adapters
from tests.conftest import ADAPTERS, assert_clean_error, run_cli
from tests.peft_ref import peft_model
from tests.tiny_models import build_base

BASIC, PATTERNS = ADAPTERS / "llama-basic", ADAPTERS / "llama-rslora-patterns"


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    """Another r=4 LLaMA adapter (rsLoRA, other targets, other alpha) made by PEFT."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("second") / "adapter"
    torch.manual_seed(5)
    cfg = LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    get_peft_model(build_base("llama"), cfg).save_pretrained(str(out))
    return out


def deltas(path) -> dict[str, np.ndarray]:
    adapter = loratools.load_adapter(path)
    out = {}
    for p, m in adapter.modules.items():
        a, b = (t.double().numpy() for t in adapter.factors(p))
        out[p] = m.scaling * b @ a
    return out


def weighted_sum(paths, weights) -> dict[str, np.ndarray]:
    total: dict[str, np.ndarray] = {}
    for path, w in zip(paths, weights):
        for p, d in deltas(path).items():
            total[p] = total.get(p, 0) + w * d
    return total


def test_cat_is_the_exact_weighted_sum(tmp_path, second):
    out = tmp_path / "out"
    result = run_cli("combine", BASIC, PATTERNS, second, "--out", out, "--weights", "1,-0.5,2", "--json")
    assert result.returncode == 0, result.stderr
    expected, ours = weighted_sum([BASIC, PATTERNS, second], [1, -0.5, 2]), deltas(out)
    assert set(ours) == set(expected)
    for p in expected:
        np.testing.assert_allclose(ours[p], expected[p], rtol=1e-5, atol=1e-6)
    combined = loratools.load_adapter(out)
    q0 = combined.modules["model.layers.0.self_attn.q_proj"]
    assert q0.rank == 4 + 4 + 4 and q0.scaling == 1.0  # ranks add up; scaling 1
    assert not combined.config.use_rslora
    report = json.loads(result.stdout)
    assert report["modules"]["model.layers.0.mlp.gate_proj"] == {"rank": 4, "inputs": 1}
    peft_model("llama", out)  # loads with no missing or unexpected key


def test_output_is_not_over_scaled_for_rslora_inputs(tmp_path, second):
    """PEFT's add_weighted_adapter keeps use_rslora with lora_alpha = r, so its result is
    scaled by √r; ours is exactly the sum, also as PEFT computes it when it loads the file."""
    out = tmp_path / "out"
    assert run_cli("combine", second, "--out", out).returncode == 0
    model = peft_model("llama", out)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    np.testing.assert_allclose(layer.get_delta_weight("default").double().numpy(),
                               deltas(second)["model.layers.0.self_attn.q_proj"], rtol=1e-5, atol=1e-6)


def test_svd_is_the_truncated_svd_of_the_sum(tmp_path, second):
    out = tmp_path / "out"
    assert run_cli("combine", BASIC, second, "--out", out, "--method", "svd", "--rank", "3", "--weights", "1,-1").returncode == 0
    expected, ours = weighted_sum([BASIC, second], [1, -1]), deltas(out)
    for p, total in expected.items():
        u, s, vh = np.linalg.svd(total, full_matrices=False)
        np.testing.assert_allclose(ours[p], (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5 * s[0])
    peft_model("llama", out)


def test_svd_at_full_rank_is_the_exact_sum(tmp_path, second):
    out = tmp_path / "out"
    assert run_cli("combine", BASIC, second, "--out", out, "--method", "svd", "--rank", "64").returncode == 0
    expected, ours = weighted_sum([BASIC, second], [1, 1]), deltas(out)
    for p in expected:
        np.testing.assert_allclose(ours[p], expected[p], rtol=1e-5, atol=1e-5)


def test_svd_by_energy_and_default_rank(tmp_path, second):
    assert run_cli("combine", BASIC, second, "--out", tmp_path / "e", "--method", "svd", "--energy", "0.5").returncode == 0
    ranks = {m.rank for m in loratools.load_adapter(tmp_path / "e").modules.values()}
    assert ranks and max(ranks) < 8
    assert run_cli("combine", BASIC, PATTERNS, "--out", tmp_path / "d", "--method", "svd").returncode == 0
    combined = loratools.load_adapter(tmp_path / "d")
    assert combined.modules["model.layers.1.mlp.down_proj"].rank == 6  # the largest input rank there


def peft_weighted(paths, weights, method, **kwargs):
    """PEFT's add_weighted_adapter on the same files: ΔW of the new adapter per module."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(build_base("llama"), str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], start=1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(paths))]
    model.add_weighted_adapter(names, list(weights), "m", combination_type=method, **kwargs)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "m" in module.lora_A:
            out[name] = module.get_delta_weight("m").double().numpy()
    return out


@pytest.mark.parametrize("method,kwargs", [
    ("linear", {}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.7, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.3}),
])
def test_peft_methods_equal_add_weighted_adapter(tmp_path, second, method, kwargs):
    out = tmp_path / "out"
    args = ["--method", method, "--weights", "0.7,-1.3"]
    if "density" in kwargs:
        args += ["--density", str(kwargs["density"])]
    if "majority_sign_method" in kwargs:
        args += ["--majority-sign", kwargs["majority_sign_method"]]
    assert run_cli("combine", BASIC, second, "--out", out, *args).returncode == 0
    reference, ours = peft_weighted([BASIC, second], [0.7, -1.3], method, **kwargs), deltas(out)
    assert set(ours) == set(reference)
    for p in reference:
        np.testing.assert_allclose(ours[p], reference[p], rtol=1e-5, atol=1e-6, err_msg=p)
    peft_model("llama", out)


def test_linear_is_not_the_weighted_sum(tmp_path, second):
    assert run_cli("combine", BASIC, second, "--out", tmp_path / "o", "--method", "linear").returncode == 0
    p = "model.layers.0.self_attn.q_proj"
    assert not np.allclose(deltas(tmp_path / "o")[p], weighted_sum([BASIC, second], [1, 1])[p], atol=1e-4)


def _content_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """A mask that depends only on the values, so PEFT and loratools draw the same one."""
    return ((torch.sin(t.double() * 12345.678) * 0.5 + 0.5) < density).to(t.dtype)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_peft_given_the_same_masks(monkeypatch, second, method):
    import peft.utils.merge_utils as mu

    monkeypatch.setattr(mu, "random_pruning", lambda t, density, rescale: t * _content_mask(t, density) / density)
    reference = peft_weighted([BASIC, second], [1.0, 0.5], method, density=0.6)
    adapters = [loratools.load_adapter(BASIC), loratools.load_adapter(second)]
    combined, _ = combine_adapters(adapters, method=method, weights=[1.0, 0.5], density=0.6, mask_fn=_content_mask)
    for p, ref in reference.items():
        a, b = (t.double().numpy() for t in combined.factors(p))
        np.testing.assert_allclose(b @ a, ref, rtol=1e-5, atol=1e-6, err_msg=p)


def test_dare_is_reproducible_with_a_seed(tmp_path, second):
    def run(name, seed):
        args = ["--method", "dare_ties", "--density", "0.5", "--seed", str(seed)]
        assert run_cli("combine", BASIC, second, "--out", tmp_path / name, *args).returncode == 0
        return (tmp_path / name / "adapter_model.safetensors").read_bytes()

    first = run("a", 1)
    assert run("b", 1) == first
    assert run("c", 2) != first


def test_extras_are_carried_from_their_only_owner(tmp_path):
    out = tmp_path / "out"
    assert run_cli("combine", ADAPTERS / "bert-modules-to-save", "--out", out).returncode == 0
    combined, source = loratools.load_adapter(out), loratools.load_adapter(ADAPTERS / "bert-modules-to-save")
    assert {e.target for e in combined.extras} == {e.target for e in source.extras}
    assert combined.config.modules_to_save == ["classifier"]
    peft_model("bert", out)


@pytest.mark.parametrize("args,fragment,code", [
    ([BASIC, ADAPTERS / "gpt2-conv1d"], "different architectures", 1),
    ([ADAPTERS / "bert-modules-to-save", ADAPTERS / "bert-modules-to-save"], "replaced by both", 1),
    ([BASIC, ADAPTERS / "llama-dora"], "DoRA", 1),
    ([ADAPTERS / "gpt2-conv1d", ADAPTERS / "gpt2-lora-bias"], "lora_bias", 1),
    ([BASIC, PATTERNS, "--method", "linear"], "equal ranks", 1),
    ([BASIC, PATTERNS, "--method", "ties"], "--density", 2),
    ([BASIC, PATTERNS, "--weights", "1,2,3"], "3 weights for 2 adapters", 2),
    ([BASIC, PATTERNS, "--rank", "2"], "--method svd only", 2),
    ([ADAPTERS / "bert-modules-to-save", "--weights", "2"], "cannot be weighted", 1),
])
def test_refusals_are_clean(tmp_path, args, fragment, code):
    result = run_cli("combine", *args, "--out", tmp_path / "out")
    assert_clean_error(result, fragment, code=code)
    assert not (tmp_path / "out").exists()


def test_incompatible_shapes(tmp_path):
    from peft import LoraConfig, get_peft_model

    from tests.tiny_models import save_llama_variant

    save_llama_variant(tmp_path / "wide", hidden_size=32)
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "wide"))
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(str(tmp_path / "a"))
    result = run_cli("combine", BASIC, tmp_path / "a", "--out", tmp_path / "out")
    assert_clean_error(result, "model.layers.0.self_attn.q_proj", "incompatible shapes", code=1)
