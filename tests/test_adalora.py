"""AdaLoRA adapters: read everywhere as the plain LoRA they equal, against PEFT's AdaLoRA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import BASES, assert_clean_error, run_cli
from tests.peft_ref import peft_merged_state_dict
from tests.tiny_models import build_base


@pytest.fixture(scope="module")
def adalora(tmp_path_factory):
    """A trained-looking AdaLoRA adapter whose budget allocator pruned ranks (rank_pattern masks),
    one module pruned to rank 0 by hand (as the allocator can)."""
    from peft import AdaLoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adalora")
    model = build_base("llama")
    config = AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                           total_step=10, tinit=1, tfinal=2)
    peft = get_peft_model(model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    peft.train()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    for step in range(10):
        peft.zero_grad()
        peft(input_ids=ids, labels=ids).loss.backward()
        peft.base_model.update_and_allocate(step)
    peft.save_pretrained(root / "ada")
    saved = json.loads((root / "ada" / "adapter_config.json").read_text())
    assert any(not all(mask) for mask in saved["rank_pattern"].values())  # ranks were pruned
    # Prune one module to rank 0, as PEFT saves it.
    path = "model.layers.1.self_attn.q_proj"
    saved["rank_pattern"][f"{path}.lora_E"] = [False] * 6
    tensors = load_file(str(root / "ada" / "adapter_model.safetensors"))
    for part in ("lora_A", "lora_E"):
        tensors[f"base_model.model.{path}.{part}"] = tensors[f"base_model.model.{path}.{part}"][:0].contiguous()
    tensors[f"base_model.model.{path}.lora_B"] = tensors[f"base_model.model.{path}.lora_B"][:, :0].contiguous()
    (root / "zero").mkdir()
    (root / "zero" / "adapter_config.json").write_text(json.dumps(saved))
    save_file(tensors, str(root / "zero" / "adapter_model.safetensors"))
    return root / "ada", root / "zero"


def _peft(adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(build_base("llama"), str(adapter)).eval()


def _deltas(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model."): m.get_delta_weight("default").detach()
            for n, m in model.named_modules() if hasattr(m, "get_delta_weight") and "default" in getattr(m, "r", {})}


@pytest.mark.parametrize("which", [0, 1])
def test_merge_equals_peft_adalora_merge(adalora, tmp_path, which):
    adapter = adalora[which]
    result = run_cli("merge", BASES / "llama", adapter, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    reference = peft_merged_state_dict("llama", BASES / "llama", adapter)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-7)


def test_info_and_validate(adalora):
    ada, zero = adalora
    info = json.loads(run_cli("info", zero, "--json").stdout)
    assert info["peft_type"] == "ADALORA" and info["pruned_modules"] == ["model.layers.1.self_attn.q_proj"]
    assert len(info["modules"]) == 5
    assert run_cli("validate", ada, zero).returncode == 0
    result = run_cli("validate", ada, "--target", "vllm")
    assert result.returncode == 1 and "vllm-peft-type" in result.stdout and "--to-lora" in result.stdout


def test_svd_spectra_are_those_of_peft_delta(adalora):
    ada, _ = adalora
    result = run_cli("svd", ada, "--json")
    assert result.returncode == 0, result.stderr
    rows = {m["name"]: m for m in json.loads(result.stdout)["modules"]}
    for path, delta in _deltas(_peft(ada)).items():
        sigma = torch.linalg.svdvals(delta.double())
        got = torch.tensor(rows[path]["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(got, sigma[: got.numel()], rtol=1e-5, atol=1e-7)


def test_convert_to_lora_is_exact_with_the_kept_ranks(adalora, tmp_path):
    ada, zero = adalora
    for source in (ada, zero):
        out = tmp_path / source.name
        result = run_cli("convert", source, out, "--to-lora")
        assert result.returncode == 0, result.stderr
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and "init_r" not in config
        before, after = _deltas(_peft(source)), _deltas(_peft(out))
        for path, delta in before.items():
            if delta.abs().max() == 0:  # pruned to rank 0: left out
                assert path not in after
                continue
            assert after[path].shape == delta.shape
            torch.testing.assert_close(after[path], delta, rtol=1e-5, atol=1e-7)
        ranks = {n: m.r["default"] for n, m in _peft(out).named_modules() if "default" in getattr(m, "r", {})}
        masks = json.loads((source / "adapter_config.json").read_text())["rank_pattern"]
        for path, rank in ranks.items():
            assert rank == sum(masks[f"{path.removeprefix('base_model.model.')}.lora_E"])


def test_broken_adalora_is_a_clean_error(adalora, tmp_path):
    ada, _ = adalora
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((ada / "adapter_config.json").read_text())
    key = next(iter(config["rank_pattern"]))
    config["rank_pattern"][key] = [True] * 6  # says 6 kept; the file has fewer
    (broken / "adapter_config.json").write_text(json.dumps(config))
    (broken / "adapter_model.safetensors").write_bytes((ada / "adapter_model.safetensors").read_bytes())
    if sum(json.loads((ada / "adapter_config.json").read_text())["rank_pattern"][key]) == 6:
        pytest.skip("that module kept all its ranks")
    assert_clean_error(run_cli("merge", BASES / "llama", broken, tmp_path / "out"), "rank_pattern keeps 6 of 6")
    result = run_cli("validate", broken, "--json")
    assert result.returncode == 1
    assert [f["code"] for f in json.loads(result.stdout)["results"][0]["findings"]] == ["adalora-rank"]
    assert not (tmp_path / "out").exists()
