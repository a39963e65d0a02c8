"""PiSSA / OLoRA / LoRA-GA adapters (trained on a base PEFT rewrote) as LoRA on the original base,
given the initial adapter: against PEFT's own conversion (path_initial_model_for_weight_conversion);
and initial adapters that are not the adapter's own (another base's, another init's, the trained
adapter, another config) refused through the CLI with nothing written. All made by PEFT on tiny
seeded models. (CorDA is not among them: PEFT 0.21's corda.py imports `attr`, not installed here.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import assert_clean_error, run_cli
from tests.peft_ref import peft_merged_state_dict
from tests.tiny_models import build_base


TARGETS = ["q_proj", "v_proj", "down_proj"]
INITS = ["pissa", "pissa_niter_2", "olora", "lora_ga"]
BASE_CHECKED = ["pissa", "pissa_niter_2", "olora"]  # LoRA-GA's values come from gradients, not from W


def peft_initial(root, init, seed=0, dtype=None):
    """PEFT's init on a fresh tiny llama (seed): (its original base dir, the PEFT model, the initial
    adapter dir, saved as PEFT's docs do). dtype: initialise on the model cast to it (the base dir
    keeps float32)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import LoraGAConfig

    model = build_base("llama", seed)
    model.save_pretrained(root / "base")  # the original W, before PEFT rewrites it
    if dtype is not None:
        model = model.to(dtype)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=TARGETS,
                        lora_ga_config=LoraGAConfig() if init == "lora_ga" else None)
    if init == "lora_ga":
        from peft.tuners.lora.loraga import preprocess_loraga

        ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(seed))
        preprocess_loraga(model, config, train_step=lambda: model(input_ids=ids, labels=ids).loss.backward())
    peft = get_peft_model(model, config)
    peft.peft_config["default"].init_lora_weights = True  # as PEFT's docs save the initial adapter
    peft.save_pretrained(root / "initial")
    peft.peft_config["default"].init_lora_weights = init
    return root / "base", peft, root / "initial"


def train_and_convert(root, init, dtype=None):
    """(original base dir, trained adapter, initial adapter, PEFT's converted adapter)."""
    base, peft, initial = peft_initial(root, init, dtype=dtype)
    torch.manual_seed(3)
    with torch.no_grad():  # "training"
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.05)
    peft.save_pretrained(root / "trained")
    peft.save_pretrained(root / "peft-converted", path_initial_model_for_weight_conversion=str(initial))
    return base, root / "trained", initial, root / "peft-converted"


@pytest.fixture(scope="module", params=INITS)
def trained(request, tmp_path_factory):
    return train_and_convert(tmp_path_factory.mktemp(request.param), request.param)


def assert_merges_as_peft_converts(base, adapter, initial, converted, out):
    result = run_cli("merge", base, adapter, out, "--initial", initial)
    assert result.returncode == 0, result.stderr
    ours = load_file(str(out / "model.safetensors"))
    reference = peft_merged_state_dict("llama", base, converted)
    assert ours.keys() <= reference.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6)


def assert_refused(base, adapter, initial, tmp_path, *fragments, needs_base=False):
    """merge and convert --to-lora refuse `initial`, writing nothing; convert is given --base
    when only the base can tell (needs_base), else it refuses from the files alone."""
    assert_clean_error(run_cli("merge", base, adapter, tmp_path / "out", "--initial", initial), *fragments)
    with_base = ["--base", base] if needs_base else []
    assert_clean_error(run_cli("convert", adapter, tmp_path / "o", "--to-lora", "--initial", initial, *with_base), *fragments)
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


TWO = pytest.mark.parametrize("trained", ["pissa", "olora"], indirect=True)


@TWO
def test_validate_warns_and_merge_refuses_without_initial(trained, tmp_path):
    base, adapter, _, _ = trained
    result = run_cli("validate", adapter, "--json")
    findings = json.loads(result.stdout)["results"][0]["findings"]
    assert result.returncode == 0 and [f["code"] for f in findings] == ["needs-initial"]
    assert findings[0]["severity"] == "warning"
    assert_clean_error(run_cli("merge", base, adapter, tmp_path / "out"), "--initial DIR")
    assert not (tmp_path / "out").exists()


def test_merge_with_initial_equals_peft_conversion(trained, tmp_path):
    assert_merges_as_peft_converts(*trained, tmp_path / "out")


@TWO
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
    # with the base, the initial adapter's values are checked too; the conversion is the same
    result = run_cli("convert", adapter, tmp_path / "checked", "--to-lora", "--initial", initial, "--base", base)
    assert result.returncode == 0, result.stderr
    written, checked_written = (load_file(str(d / "adapter_model.safetensors")) for d in (out, tmp_path / "checked"))
    assert written.keys() == checked_written.keys()
    assert all(torch.equal(written[k], checked_written[k]) for k in written)


@TWO
def test_initial_must_be_the_adapters_own(trained, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, adapter, _, _ = trained
    get_peft_model(build_base("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"])).save_pretrained(tmp_path / "other")
    assert_clean_error(run_cli("merge", base, adapter, tmp_path / "out", "--initial", tmp_path / "other"), "not its initial adapter")
    assert_clean_error(run_cli("convert", adapter, tmp_path / "o", "--to-lora", "--initial", tmp_path / "other"), "not its initial adapter")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("trained", BASE_CHECKED, indirect=True)
def test_another_bases_initial_is_refused(trained, tmp_path):
    """The same init on another base (same modules and shapes, other values): only the base can
    tell (convert without --base checks the files alone, as the README says)."""
    base, adapter, _, _ = trained
    init = json.loads((adapter / "adapter_config.json").read_text())["init_lora_weights"]
    (tmp_path / "other").mkdir()
    _, _, other = peft_initial(tmp_path / "other", init, seed=1)
    assert_refused(base, adapter, other, tmp_path, "the initial adapter's", "of base model.layers.0.",
                   "made for another base or with another init", needs_base=True)


def test_another_inits_initial_is_refused(trained, tmp_path):
    """OLoRA's initial adapter for a PiSSA/LoRA-GA adapter, PiSSA's for an OLoRA one, on the same base:
    the factors do not have the form the adapter's init gives them, which needs no base."""
    base, adapter, _, _ = trained
    init = json.loads((adapter / "adapter_config.json").read_text())["init_lora_weights"]
    other_init, form = ("pissa", "not OLoRA's") if init == "olora" else ("olora", "not LoRA-GA's" if init == "lora_ga" else "not PiSSA's")
    (tmp_path / "other").mkdir()
    _, _, other = peft_initial(tmp_path / "other", other_init)
    assert_refused(base, adapter, other, tmp_path, form, "not the initial adapter")


@TWO
def test_trained_adapter_as_its_own_initial_is_refused(trained, tmp_path):
    base, adapter, _, _ = trained
    fragment = "it is the trained adapter"
    assert_refused(base, adapter, adapter, tmp_path, fragment)


@pytest.mark.parametrize("trained", ["pissa"], indirect=True)
@pytest.mark.parametrize("field, value", [("lora_alpha", 16), ("init_lora_weights", "olora"),
                                          ("target_modules", ["q_proj", "v_proj", "o_proj"])])
def test_initial_config_must_match(trained, tmp_path, field, value):
    base, adapter, initial, _ = trained
    edited = tmp_path / "initial"
    shutil.copytree(initial, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    config[field] = value
    (edited / "adapter_config.json").write_text(json.dumps(config))
    fragment = f"its {field} is {value!r}"
    assert_refused(base, adapter, edited, tmp_path, fragment, "not its initial adapter")


def test_initial_of_a_bfloat16_model_merges(tmp_path):
    """PEFT initialised on the float32 base loaded in bfloat16: its factors are bfloat16 values
    (stored as float32) from the bfloat16-rounded W; the tolerances allow for both."""
    assert_merges_as_peft_converts(*train_and_convert(tmp_path, "pissa", dtype=torch.bfloat16), tmp_path / "out")


@pytest.mark.parametrize("trained", ["pissa"], indirect=True)
@pytest.mark.parametrize("inside", ["adapter", "initial"])
def test_output_inside_an_input_adapter_is_refused(trained, inside):
    base, adapter, initial, _ = trained
    out = (adapter if inside == "adapter" else initial) / "merged"
    assert_clean_error(run_cli("merge", base, adapter, out, "--initial", initial))
    assert_clean_error(run_cli("convert", adapter, out, "--to-lora", "--initial", initial))
    assert not out.exists()
