"""Adapters trained with added tokens (issue #22): the user resized the embedding and the head
(resize_token_embeddings(N + k)) before training and PEFT saved the resized layers whole. Each
case is built with PEFT on a tiny seeded model: BASE is saved with N tokens, a copy is resized
and given an adapter whose trained weights are randomised. `loratools merge BASE ADAPTER OUT`
must give PEFT's merge_and_unload on the resized model, vocab_size N + k in config.json, and
OUT loaded by transformers must compute the PEFT model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import assert_clean_error, run_cli
from tests.merged import merged_tensors
from tests.test_merge_tied_head import load, logits
from tests.test_real_world import merge_matches_peft, peft_adapter

N, M = 64, 70  # the base's vocabulary, and the resized one
# family -> (tied, config fields, LoRA targets, the token embedding as saved by transformers)
FAMILIES = {
    "llama": (False, dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
              ["q_proj"], "model.embed_tokens.weight"),
    "qwen2": (True, dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
              ["q_proj"], "model.embed_tokens.weight"),
    "gpt2": (True, dict(n_embd=16, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0), ["c_attn"], "transformer.wte.weight"),
}


def tiny_lm(family: str):
    import transformers

    tied, sizes, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(family, vocab_size=N, max_position_embeddings=64, tie_word_embeddings=tied, **sizes)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def resized_adapter(tmp_path, family: str, save_embedding_layers: bool = False, **lora):
    """(BASE with N tokens, the resized base the adapter was trained on, the adapter). With
    save_embedding_layers the model records BASE as its origin, so PEFT's default ("auto") sees
    the vocabulary changed and saves the embedding and the head whole, as it does for users."""
    base_dir = tmp_path / "base"
    tiny_lm(family).save_pretrained(str(base_dir))

    def resized():
        model = tiny_lm(family)
        torch.manual_seed(3)  # the added rows: resize_token_embeddings draws them at random
        model.resize_token_embeddings(M)
        if save_embedding_layers:
            model.name_or_path = str(base_dir)
        return model

    lora.setdefault("target_modules", FAMILIES[family][2])
    resized_dir, adapter_dir = peft_adapter(tmp_path / "trained", resized, trained=("lora_", "modules_to_save"),
                                            init_lora_weights=False, **lora)
    return base_dir, resized_dir, adapter_dir


@torch.no_grad()
def peft_logits(resized_dir, adapter_dir) -> torch.Tensor:
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(load(resized_dir), str(adapter_dir)).eval())


def merge_as_peft(tmp_path, base_dir, resized_dir, adapter_dir, tied_out: bool):
    """Merge; OUT's tensors are PEFT's merge_and_unload on the resized model, its config says
    vocab_size M (and untied where the merge made head and embedding differ), transformers loads
    it, and its logits are the PEFT model's."""
    ours, _ = merge_matches_peft(tmp_path, base_dir, adapter_dir, trained_on=resized_dir)
    assert ("lm_head.weight" not in ours) is tied_out
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == M
    assert config.get("tie_word_embeddings", True) is tied_out
    model = load(out)
    assert model.get_input_embeddings().weight.shape == (M, 16)
    assert model.get_output_embeddings().weight.shape == (M, 16)
    assert (model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) is tied_out
    torch.testing.assert_close(logits(model), peft_logits(resized_dir, adapter_dir), rtol=1e-4, atol=1e-5)
    return ours


@pytest.mark.parametrize("family", list(FAMILIES))
def test_modules_to_save_of_a_resized_vocabulary(tmp_path, family):
    embed = FAMILIES[family][3].split(".")[-2]
    base_dir, resized_dir, adapter_dir = resized_adapter(tmp_path, family, modules_to_save=[embed, "lm_head"])
    ours = merge_as_peft(tmp_path, base_dir, resized_dir, adapter_dir, tied_out=False)
    assert ours[FAMILIES[family][3]].shape == ours["lm_head.weight"].shape == (M, 16)
    assert not torch.equal(ours[FAMILIES[family][3]], ours["lm_head.weight"])  # trained apart: written apart


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_embedding_layers_of_a_resized_vocabulary(tmp_path, family):
    """PEFT's default once the vocabulary changed: embedding and head saved whole (frozen, so a
    tied pair is saved twice, equal, and stays tied)."""
    tied = FAMILIES[family][0]
    base_dir, resized_dir, adapter_dir = resized_adapter(tmp_path, family, save_embedding_layers=True)
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert saved[f"base_model.model.{FAMILIES[family][3]}"].shape == (M, 16)
    assert saved["base_model.model.lm_head.weight"].shape == (M, 16)
    ours = merge_as_peft(tmp_path, base_dir, resized_dir, adapter_dir, tied_out=tied)
    base = merged_tensors(base_dir)
    torch.testing.assert_close(ours[FAMILIES[family][3]][:N], base[FAMILIES[family][3]], rtol=0, atol=0)


def test_lora_on_a_resized_embedding_and_head(tmp_path):
    """LoRA on embed_tokens and lm_head: PEFT saves both base layers (resized); ΔW is added to them."""
    base_dir, resized_dir, adapter_dir = resized_adapter(tmp_path, "llama", target_modules=["q_proj", "embed_tokens", "lm_head"])
    merge_as_peft(tmp_path, base_dir, resized_dir, adapter_dir, tied_out=False)


def test_validate_and_info_report_the_growth(tmp_path):
    base_dir, _, adapter_dir = resized_adapter(tmp_path, "qwen2", modules_to_save=["embed_tokens", "lm_head"])
    result = run_cli("validate", adapter_dir, "--base", base_dir, "--strict", "--json")
    assert result.returncode == 0, result.stdout
    findings = json.loads(result.stdout)["results"][0]["findings"]
    assert [(f["code"], f["severity"]) for f in findings] == [("vocab-resized", "notice")]
    assert f"from {N} to {M} tokens" in findings[0]["message"]
    text = run_cli("validate", adapter_dir, "--base", base_dir).stdout
    assert "notice  vocab-resized" in text and "base-vocab-size" not in text
    info = run_cli("info", adapter_dir, "--base", base_dir, "--json")
    assert json.loads(info.stdout)["base"]["vocabulary"] == {"base": N, "adapter": M}
    assert f"vocabulary grows from {N} to {M} tokens" in run_cli("info", adapter_dir, "--base", base_dir).stdout


def _refused(base_dir, adapter_dir, out, *fragments):
    result = run_cli("merge", base_dir, adapter_dir, out)
    assert_clean_error(result, *fragments)
    assert not out.exists()
    report = json.loads(run_cli("validate", adapter_dir, "--base", base_dir, "--json").stdout)["results"][0]
    assert not report["ok"] and "base-vocab-size" in {f["code"] for f in report["findings"]}
    assert "vocab-resized" not in {f["code"] for f in report["findings"]}


def test_a_head_whose_added_rows_are_not_saved_is_refused(tmp_path):
    """modules_to_save on a tied embedding alone: the PEFT model's head is the resized base
    embedding, whose added rows were drawn at random and not saved."""
    base_dir, _, adapter_dir = resized_adapter(tmp_path, "gpt2", modules_to_save=["wte"])
    _refused(base_dir, adapter_dir, tmp_path / "out", "lm_head.weight", f"{M} rows",
             "exist only in the model it was trained on")


def test_an_untied_head_left_out_is_refused(tmp_path):
    """LoRA on embed_tokens alone: PEFT saves the resized embedding but not the resized lm_head."""
    base_dir, _, adapter_dir = resized_adapter(tmp_path, "llama", target_modules=["q_proj", "embed_tokens"])
    assert "base_model.model.lm_head.weight" not in load_file(str(adapter_dir / "adapter_model.safetensors"))
    _refused(base_dir, adapter_dir, tmp_path / "out", "not lm_head.weight", f"resized from {N}")


def test_lora_on_a_resized_embedding_without_its_rows_is_refused(tmp_path):
    """An embedding LoRA of M tokens whose resized base layer was not saved (save_embedding_layers=False)."""
    base_dir, _, adapter_dir = resized_adapter(tmp_path, "llama", target_modules=["q_proj", "embed_tokens"])
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["base_model.model.model.embed_tokens.base_layer.weight"]
    save_file(tensors, str(weights))
    _refused(base_dir, adapter_dir, tmp_path / "out", "module model.embed_tokens", f"vocabulary has {M} tokens",
             f"has {N} rows", "does not save the resized model.embed_tokens")


@pytest.mark.parametrize("family, saved", [("llama", dict(modules_to_save=["embed_tokens", "lm_head"])),
                                           ("qwen2", dict(save_embedding_layers=True))])
def test_extract_of_a_resized_fine_tune_round_trips(tmp_path, family, saved):
    """extract BASE FINETUNED, FINETUNED with added tokens: the embedding and an untied head are
    stored whole (modules_to_save); merging the extracted adapter gives the fine-tune's rows."""
    base_dir, _, adapter_dir = resized_adapter(tmp_path, family, **saved)
    finetuned = tmp_path / "finetuned"
    assert run_cli("merge", base_dir, adapter_dir, finetuned).returncode == 0
    result = run_cli("extract", base_dir, finetuned, tmp_path / "extracted", "--rank", "2", "--json")
    assert result.returncode == 0, result.stderr
    embed = FAMILIES[family][3]
    tokens = {embed} if FAMILIES[family][0] else {embed, "lm_head.weight"}
    assert tokens <= set(json.loads(result.stdout)["saved"])
    assert run_cli("merge", base_dir, tmp_path / "extracted", tmp_path / "again").returncode == 0
    again, wanted = merged_tensors(tmp_path / "again"), merged_tensors(finetuned)
    assert set(again) == set(wanted)
    for name in tokens:
        assert again[name].shape == (M, 16)
        torch.testing.assert_close(again[name], wanted[name], rtol=0, atol=0)
    for name in set(wanted) - tokens:  # the rank-2 LoRA on q_proj, recovered to round-off
        torch.testing.assert_close(again[name], wanted[name], rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["vocab_size"] == M
