"""`loratools extract`: the inverse of merge, checked against PEFT. A fine-tune made by PEFT's own
merge_and_unload of a known adapter must give back that adapter's ΔW at rank >= r; PEFT must load
every output with no missing or unexpected key and compute what the fine-tuned model computes."""

from __future__ import annotations

import json

import pytest
import torch

from loratools.ops.extract import low_rank_factors
from tests.conftest import assert_clean_error, run_cli
from tests.merged import merged_tensors
from tests.peft_ref import outputs, peft_model
from tests.test_real_world import peft_adapter, tied_llama
from tests.tiny_models import build_base, save_llama_variant

TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D, stored transposed; c_attn fuses q, k, v
    "bert": ["query", "value", "dense"],
}


def finetune_by_peft(tmp_path, family, build=None, **config):
    """(base dir, adapter dir, fine-tuned dir, PEFT model of the adapter): the fine-tune is PEFT's
    merge_and_unload of a random adapter, saved by transformers."""
    from peft import PeftModel

    build = build or (lambda: build_base(family))
    base_dir, adapter_dir = peft_adapter(tmp_path, build, **config)
    merged = PeftModel.from_pretrained(build(), str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(tmp_path / "ft"))
    return base_dir, adapter_dir, tmp_path / "ft", merged


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA layer of a PEFT model, as PEFT computes it (get_delta_weight)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix): m.get_delta_weight("default").detach()
            for name, m in model.named_modules() if isinstance(m, LoraLayer) and m.lora_A or isinstance(m, LoraLayer) and m.lora_embedding_A}


def extract(base_dir, ft_dir, out, *args):
    result = run_cli("extract", base_dir, ft_dir, out, "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("rank", [2, 5])
def test_extract_recovers_every_delta_peft_merged(tmp_path, family, rank):
    base_dir, adapter_dir, ft_dir, finetuned = finetune_by_peft(tmp_path, family, target_modules=TARGETS[family])
    report = extract(base_dir, ft_dir, tmp_path / "out", "--rank", str(rank))
    original = peft_deltas(peft_model(family, adapter_dir))
    extracted = peft_deltas(peft_model(family, tmp_path / "out"))  # no missing/unexpected key
    assert set(extracted) == set(original) and len(report["modules"]) == len(original)
    for name, delta in original.items():
        torch.testing.assert_close(extracted[name], delta, atol=2e-6, rtol=1e-4)
    assert all(m["rank"] == rank and m["retained_energy"] > 1 - 1e-5 and m["relative_error"] < 1e-5 for m in report["modules"])
    assert report["not_extracted"] == {}
    torch.testing.assert_close(outputs(peft_model(family, tmp_path / "out"), family), outputs(finetuned, family), atol=1e-5, rtol=1e-4)
    # and merging it back gives the fine-tune
    assert run_cli("merge", base_dir, tmp_path / "out", tmp_path / "remerged").returncode == 0
    for name, tensor in merged_tensors(ft_dir).items():
        torch.testing.assert_close(merged_tensors(tmp_path / "remerged")[name], tensor, atol=2e-6, rtol=1e-5)


def perturbed_finetune(tmp_path, family="llama", seed=7):
    """A full fine-tune: every weight (norms and biases too) moved by a dense, full-rank change
    with a decaying spectrum, as training does."""
    model = build_base(family)
    model.save_pretrained(str(tmp_path / "base"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                m, n = param.shape
                u = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen)).Q
                v = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen)).Q
                sigma = 0.05 * 0.7 ** torch.arange(min(m, n), dtype=torch.float32)
                param.add_((u * sigma) @ v.T)
            else:
                param.add_(0.01 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(str(tmp_path / "ft"))
    return tmp_path / "base", tmp_path / "ft"


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_energy_thresholds_hold_on_a_full_finetune(tmp_path, threshold):
    from safetensors.torch import load_file

    base_dir, ft_dir = perturbed_finetune(tmp_path)
    report = extract(base_dir, ft_dir, tmp_path / "out", "--energy", str(threshold))
    base, tuned = merged_tensors(base_dir), merged_tensors(ft_dir)
    factors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert report["modules"], report
    for m in report["modules"]:
        name = m["name"]
        key = f"base_model.model.{name}"
        if f"{key}.lora_A.weight" in factors:
            a, b = factors[f"{key}.lora_A.weight"], factors[f"{key}.lora_B.weight"]
        else:
            a, b = factors[f"{key}.lora_embedding_A"], factors[f"{key}.lora_embedding_B"]
        d = (tuned[f"{name}.weight"] - base[f"{name}.weight"]).double()
        d = d if "embed" not in name else d.T
        kept = 1 - float(torch.linalg.norm(d - b.double() @ a.double())) ** 2 / float(torch.linalg.norm(d)) ** 2
        assert kept >= threshold - 1e-5, (name, kept)  # the threshold holds for the factors as written
        assert m["retained_energy"] == pytest.approx(kept, abs=1e-5)
        sigma = torch.linalg.svdvals(d)
        energies = (sigma**2).cumsum(0) / (sigma**2).sum()
        if m["rank"] > 1:  # and the rank is the smallest that holds it
            assert energies[m["rank"] - 2] < threshold
    # norms changed too: LoRA cannot carry them, and the report says so
    assert any("norm" in name for name in report["not_extracted"])
    assert report["summary"]["min_retained_energy"] >= threshold - 1e-9


def test_randomized_svd_finds_the_best_approximation():
    """Eckart–Young: the randomized factors are as good as the truncated full SVD, even with a slowly
    decaying spectrum (where plain sketching without power iterations loses a few percent)."""
    gen = torch.Generator().manual_seed(0)
    m, n = 300, 500
    u = torch.linalg.qr(torch.randn(m, m, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, m, generator=gen)).Q
    d = (u * (1.0 / torch.arange(1, m + 1) ** 0.5)) @ v.T
    total = float(torch.linalg.norm(d)) ** 2
    for k in (4, 16, 64):
        a, b, kept, method = low_rank_factors(d, total, k, None, 256, False, torch.Generator().manual_seed(0))
        assert method == "randomized" and a.shape == (k, n) and b.shape == (m, k)
        best_a, best_b, _, _ = low_rank_factors(d, total, k, None, 256, True, None)
        best = torch.linalg.norm(d - best_b @ best_a)
        assert torch.linalg.norm(d - b @ a) <= best * 1.02
        assert kept == pytest.approx(1 - float(torch.linalg.norm(d - b @ a)) ** 2 / float(torch.linalg.norm(d)) ** 2, abs=1e-5)


@pytest.mark.parametrize("mode", ["lora", "save"])
@pytest.mark.parametrize("tied", [False, True])
def test_changed_embeddings_lora_or_saved(tmp_path, mode, tied):
    build = tied_llama if tied else (lambda: build_base("llama"))
    base_dir, adapter_dir, ft_dir, finetuned = finetune_by_peft(tmp_path, "llama", build, target_modules=["q_proj", "embed_tokens"])
    report = extract(base_dir, ft_dir, tmp_path / "out", "--rank", "2", "--embeddings", mode)
    assert report["tied_embedding"] is tied
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] is tied
    if mode == "save":
        assert report["saved"] == ["model.embed_tokens.weight"] and config["modules_to_save"] == ["model.embed_tokens"]
    # PEFT computes what the fine-tuned model computes (with a tied head, through the head too)
    torch.testing.assert_close(outputs(peft_model(build, tmp_path / "out"), "llama"), outputs(finetuned, "llama"), atol=1e-5, rtol=1e-4)
    assert run_cli("merge", base_dir, tmp_path / "out", tmp_path / "remerged").returncode == 0
    for name, tensor in merged_tensors(ft_dir).items():
        torch.testing.assert_close(merged_tensors(tmp_path / "remerged")[name], tensor, atol=2e-6, rtol=1e-5)


def test_skipped_embeddings_biases_and_module_choice(tmp_path):
    from safetensors.torch import load_file, save_file

    base_dir, adapter_dir, ft_dir, _ = finetune_by_peft(tmp_path, "gpt2", target_modules=["c_attn", "c_fc", "wte"])
    weights = ft_dir / "model.safetensors"
    tensors = load_file(str(weights))
    for name in ("transformer.h.0.attn.c_attn.bias", "transformer.h.0.mlp.c_fc.bias"):
        tensors[name] = tensors[name] + 0.125  # a full fine-tune trains biases too
    save_file(tensors, str(weights), metadata={"format": "pt"})
    report = extract(base_dir, ft_dir, tmp_path / "out", "--rank", "2", "--embeddings", "skip", "--modules", "c_attn,token_embed")
    assert [m["name"] for m in report["modules"]] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert report["not_extracted"]["transformer.wte.weight"] == "changed embedding, --embeddings skip"
    assert report["not_extracted"]["transformer.h.0.mlp.c_fc.weight"] == "changed, not in --modules"
    # changed biases: saved (bias="lora_only") for extracted modules, reported for the others
    assert report["saved"] == ["transformer.h.0.attn.c_attn.bias"]
    assert report["not_extracted"]["transformer.h.0.mlp.c_fc.bias"] == "changed bias"
    model = peft_model("gpt2", tmp_path / "out")
    attn = model.base_model.model.transformer.h[0].attn.c_attn.base_layer
    torch.testing.assert_close(attn.bias.detach(), tensors["transformer.h.0.attn.c_attn.bias"])
    text = run_cli("extract", base_dir, ft_dir, tmp_path / "text", "--rank", "2", "--embeddings", "skip").stdout
    assert "warning: not in the adapter: transformer.wte.weight" in text


def test_bad_inputs_are_clean_errors_and_write_nothing(tmp_path):
    base_dir, _, ft_dir, _ = finetune_by_peft(tmp_path, "llama", target_modules=["q_proj"])
    out = tmp_path / "out"
    assert_clean_error(run_cli("extract", base_dir, ft_dir, out), "exactly one of --rank K or --energy T")
    assert_clean_error(run_cli("extract", base_dir, ft_dir, out, "--energy", "1.5"), "--energy")
    assert_clean_error(run_cli("extract", base_dir, ft_dir, base_dir / "x", "--rank", "2", "--force"), "overlaps an input")
    save_llama_variant(tmp_path / "wider", intermediate_size=32)  # a resized vocabulary is extracted: test_resized_vocab.py
    assert_clean_error(run_cli("extract", base_dir, tmp_path / "wider", out, "--rank", "2"), "cannot change shapes")
    assert_clean_error(run_cli("extract", base_dir, tmp_path / "missing", out, "--rank", "2"), "missing")
    assert not out.exists()
    out.mkdir()
    assert_clean_error(run_cli("extract", base_dir, ft_dir, out, "--rank", "2"), "already exists")
    assert list(out.iterdir()) == []
