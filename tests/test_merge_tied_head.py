"""A causal LM whose lm_head is tied to its token embedding stores the two once. When an adapter
changes one of them alone (modules_to_save, or LoRA on the head), the PEFT model holds them
apart; OUT must too: the head as a tensor of its own, the embedding as the PEFT model has it,
and config.json untied. Each case is built with PEFT on a tiny seeded model of the family and
OUT, loaded by transformers, is compared with the PEFT model's logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open

from loratools.formats.safetensors_header import read_header

from tests.conftest import assert_clean_error, run_cli
from tests.merged import digest, merged_tensors
from tests.test_real_world import peft_adapter

# family -> (config fields, LoRA targets, the token embedding as saved by transformers)
FAMILIES = {
    "llama": (dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
              ["q_proj"], "model.embed_tokens.weight"),
    "gemma2": (dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4),
               ["q_proj"], "model.embed_tokens.weight"),
    "opt": (dict(hidden_size=16, ffn_dim=24, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=16),
            ["q_proj"], "model.decoder.embed_tokens.weight"),
    "falcon": (dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4), ["query_key_value"], "transformer.word_embeddings.weight"),
    "gpt2": (dict(n_embd=16, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0), ["c_attn"], "transformer.wte.weight"),
}
INPUTS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(42))


def tied_lm(family: str):
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(family, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=True,
                                               **FAMILIES[family][0])
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model


def trained_adapter(tmp_path, family: str, **lora):
    """The tied base saved, then a PEFT adapter on it whose every trained weight is randomised."""
    lora.setdefault("target_modules", FAMILIES[family][1])
    return peft_adapter(tmp_path, lambda: tied_lm(family), trained=("lora_", "modules_to_save"), init_lora_weights=False, **lora)


def adapter_keys(adapter_dir) -> set[str]:
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return {k for k in f.keys() if ".lora_" not in k}


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=INPUTS).logits


def load(path):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()


def peft_models(base_dir, adapter_dir):
    """(PEFT's model on a fresh load of the base, and what its merge_and_unload gives), both as logits."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load(base_dir), str(adapter_dir)).eval()
    unmerged = logits(model)
    return unmerged, logits(model.merge_and_unload())


def merge_untied(base_dir, adapter_dir, out, *extra):
    """Merge; OUT is untied (its own lm_head, a config.json that says so) and validate agrees."""
    result = run_cli("merge", base_dir, adapter_dir, out, *extra)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model = load(out)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert run_cli("validate", adapter_dir, "--base", base_dir).returncode == 0
    return model, merged_tensors(out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_head_of_a_tied_model_becomes_its_own_tensor(tmp_path, family):
    """modules_to_save=["lm_head"]: PEFT saves the trained head (as lm_head.weight in every family)
    and keeps the embedding; so does OUT, with the keys transformers saves for PEFT's merged model."""
    base_dir, adapter_dir = trained_adapter(tmp_path, family, modules_to_save=["lm_head"])
    assert adapter_keys(adapter_dir) == {"base_model.model.lm_head.weight"}
    embedding = FAMILIES[family][2]
    model, ours = merge_untied(base_dir, adapter_dir, tmp_path / "out")
    base = merged_tensors(base_dir)
    assert set(ours) == set(base) | {"lm_head.weight"}
    assert torch.equal(ours[embedding], base[embedding])
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        assert torch.equal(ours["lm_head.weight"], f.get_tensor("base_model.model.lm_head.weight"))
    unmerged, merged = peft_models(base_dir, adapter_dir)
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(model), merged, rtol=1e-4, atol=1e-5)
    from peft import PeftModel

    PeftModel.from_pretrained(load(base_dir), str(adapter_dir)).merge_and_unload().save_pretrained(str(tmp_path / "peft"))
    assert {k: v.shape for k, v in merged_tensors(tmp_path / "peft").items()} == {k: v.shape for k, v in ours.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_embedding_of_a_tied_model_leaves_the_head(tmp_path, family):
    """modules_to_save on the embedding: the PEFT model's head keeps the base weight (PEFT's merge
    unties the two as well)."""
    embed_module = FAMILIES[family][2].removesuffix(".weight").rpartition(".")[2]
    base_dir, adapter_dir = trained_adapter(tmp_path, family, modules_to_save=[embed_module])
    embedding = FAMILIES[family][2]
    assert adapter_keys(adapter_dir) == {f"base_model.model.{embedding}"}
    model, ours = merge_untied(base_dir, adapter_dir, tmp_path / "out")
    base = merged_tensors(base_dir)
    assert torch.equal(ours["lm_head.weight"], base[embedding]) and not torch.equal(ours[embedding], base[embedding])
    unmerged, merged = peft_models(base_dir, adapter_dir)
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(model), merged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_on_a_tied_head_changes_the_head_alone(tmp_path, family):
    """LoRA on a tied lm_head: the PEFT model adds ΔW to the head only (PEFT saves the head's base
    weight beside the factors). PEFT 0.21.2's merge_and_unload adds it to the shared tensor, which
    changes the input embedding too: another model. OUT is the PEFT model's."""
    base_dir, adapter_dir = trained_adapter(tmp_path, family, target_modules=[*FAMILIES[family][1], "lm_head"])
    assert adapter_keys(adapter_dir) == {"base_model.model.lm_head.base_layer.weight"}
    model, ours = merge_untied(base_dir, adapter_dir, tmp_path / "out")
    embedding, base = FAMILIES[family][2], merged_tensors(base_dir)
    assert torch.equal(ours[embedding], base[embedding]) and not torch.equal(ours["lm_head.weight"], base[embedding])
    unmerged, merged = peft_models(base_dir, adapter_dir)
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-4, atol=1e-5)
    assert (merged - unmerged).abs().max() > 1  # PEFT's merge: not the model it trained


def test_untied_head_in_a_sharded_base(tmp_path):
    """The head goes into the embedding's shard, after it; the index lists it there and counts
    its bytes; any number of workers writes the same files."""
    base_dir, adapter_dir = trained_adapter(tmp_path, "llama", modules_to_save=["lm_head"])
    tied_lm("llama").save_pretrained(str(base_dir), max_shard_size="4KB")  # the same base, in shards
    (base_dir / "model.safetensors").unlink(missing_ok=True)
    index = json.loads((base_dir / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.embed_tokens.weight"]
    assert len(set(index["weight_map"].values())) > 2 and shard != sorted(index["weight_map"].values())[-1]
    model, ours = merge_untied(base_dir, adapter_dir, tmp_path / "out", "--workers", "1")
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == {**index["weight_map"], "lm_head.weight": shard}
    tensors = read_header(tmp_path / "out" / shard).tensors
    assert tensors["lm_head.weight"].start == tensors["model.embed_tokens.weight"].end
    assert out_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())
    unmerged, _ = peft_models(base_dir, adapter_dir)
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-4, atol=1e-5)
    assert run_cli("merge", base_dir, adapter_dir, tmp_path / "out3", "--workers", "3").returncode == 0
    assert digest(tmp_path / "out3") == digest(tmp_path / "out")


def test_nested_text_config_is_untied_too(tmp_path):
    """A composite config (text_config inside): transformers 5 takes the tie from the top level, or
    from text_config (its default too) when the top level does not tie: both say false."""
    base_dir, adapter_dir = trained_adapter(tmp_path, "llama", modules_to_save=["lm_head"])
    config = json.loads((base_dir / "config.json").read_text())
    (base_dir / "config.json").write_text(json.dumps({**config, "text_config": {"hidden_size": 16}}))
    assert run_cli("merge", base_dir, adapter_dir, tmp_path / "out").returncode == 0
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["tie_word_embeddings"] is False and written["text_config"] == {"hidden_size": 16, "tie_word_embeddings": False}


def test_ensure_weight_tying_keeps_the_tie(tmp_path):
    """With ensure_weight_tying PEFT keeps the head tied (and saves both copies): OUT stays tied."""
    base_dir, adapter_dir = trained_adapter(tmp_path, "llama", modules_to_save=["lm_head"], ensure_weight_tying=True)
    assert adapter_keys(adapter_dir) == {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"}
    result = run_cli("merge", base_dir, adapter_dir, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "lm_head.weight" not in merged_tensors(tmp_path / "out")
    unmerged, _ = peft_models(base_dir, adapter_dir)
    torch.testing.assert_close(logits(load(tmp_path / "out")), unmerged, rtol=1e-4, atol=1e-5)


def test_untying_needs_the_config(tmp_path):
    """A bare .safetensors base has no config.json to untie the head in: refused, nothing written."""
    base_dir, adapter_dir = trained_adapter(tmp_path, "llama", modules_to_save=["lm_head"])
    result = run_cli("merge", base_dir / "model.safetensors", adapter_dir, tmp_path / "out.safetensors")
    assert_clean_error(result, "tied to model.embed_tokens.weight", "config.json")
    assert not (tmp_path / "out.safetensors").exists()
    report = json.loads(run_cli("validate", adapter_dir, "--base", base_dir / "model.safetensors", "--json").stdout)
    assert "tied-head" in json.dumps(report)
