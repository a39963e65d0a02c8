"""Adapters as real PEFT writes them beyond plain LoRA: trainable tokens, tied heads, KaSA, MiCA,
and the variants loratools refuses. Every merge is compared with PEFT's merge_and_unload on the
same files; every refusal is one clean line with nothing written."""

from __future__ import annotations

import json

import pytest
import torch

import loratools
from tests.broken import edit_config, replace_tensors
from tests.conftest import ADAPTERS, BASES, assert_clean_error, run_cli
from tests.peft_ref import peft_merged_state_dict
from tests.merged import assert_matches_peft, merged_tensors
from tests.tiny_models import build_base


def tied_llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return tf.LlamaForCausalLM(cfg).eval()


def peft_adapter(tmp_path, build, seed: int = 1, trained=("lora_", "trainable_tokens"), **config):
    """Save a fresh base, then a PEFT adapter trained on it (every adapter weight whose name has
    one of `trained` in it randomised)."""
    from peft import LoraConfig, get_peft_model

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model = build()
    model.save_pretrained(str(base_dir))  # before get_peft_model: KaSA rewrites the base in place
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, **config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if any(part in name for part in trained):
                param.add_(torch.randn_like(param) * 0.3)
    peft.save_pretrained(str(adapter_dir))
    return base_dir, adapter_dir


def merge_matches_peft(tmp_path, base_dir, adapter_dir, trained_on=None):
    """Merge into base_dir; OUT equals PEFT's merge_and_unload on `trained_on` (default: base_dir)."""
    out = tmp_path / "out"
    result = run_cli("merge", base_dir, adapter_dir, out)
    assert result.returncode == 0, result.stderr
    ours = merged_tensors(out)
    reference = peft_merged_state_dict("llama", trained_on or base_dir, adapter_dir)  # AutoModelForCausalLM, whatever the family
    assert_matches_peft(ours, reference)
    return ours, merged_tensors(base_dir)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("indices", [[1, 5, 7], {"embed_tokens": [2, 3]}])
def test_trainable_tokens_merge_as_peft(tmp_path, tied, indices):
    build = tied_llama if tied else (lambda: build_base("llama"))
    base_dir, adapter_dir = peft_adapter(tmp_path, build, target_modules=["q_proj"], trainable_token_indices=indices)
    ours, base = merge_matches_peft(tmp_path, base_dir, adapter_dir)
    rows = indices if isinstance(indices, list) else indices["embed_tokens"]
    changed = (ours["model.embed_tokens.weight"] != base["model.embed_tokens.weight"]).any(1).nonzero().flatten().tolist()
    assert changed == sorted(rows)
    info = json.loads(run_cli("info", adapter_dir, "--json").stdout)
    assert info["trainable_tokens"] == [{"module": "model.embed_tokens", "tokens": len(rows)}]
    assert run_cli("validate", adapter_dir).returncode == 0


def test_lora_on_a_tied_lm_head_changes_the_head_alone(tmp_path):
    """PEFT saves lm_head.base_layer.weight beside the factors; the base stores the head once, as
    the embedding. The PEFT model adds ΔW to the head alone, so OUT gets an lm_head of its own
    (the logits: test_merge_tied_head.py); PEFT's merge puts the same head into the shared tensor,
    changing the embedding too. (With ensure_weight_tying PEFT puts the same LoRA on the
    embedding too: see the test below.)"""
    base_dir, adapter_dir = peft_adapter(tmp_path, tied_llama, target_modules=["q_proj", "lm_head"])
    result = run_cli("merge", base_dir, adapter_dir, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    ours, base = merged_tensors(tmp_path / "out"), merged_tensors(base_dir)
    reference = peft_merged_state_dict("llama", base_dir, adapter_dir)
    assert torch.equal(ours.pop("model.embed_tokens.weight"), base["model.embed_tokens.weight"])
    assert_matches_peft(ours, reference)  # lm_head.weight among them
    assert run_cli("validate", adapter_dir, "--base", base_dir).returncode == 0


def test_lora_on_an_untied_lm_head_merges_as_peft(tmp_path):
    base_dir, adapter_dir = peft_adapter(tmp_path, lambda: build_base("llama"), target_modules=["q_proj", "lm_head"])
    merge_matches_peft(tmp_path, base_dir, adapter_dir)


def test_kasa_merges_as_peft(tmp_path):
    from peft.tuners.lora.config import KasaConfig

    base_dir, adapter_dir = peft_adapter(tmp_path, lambda: build_base("llama"), target_modules=["q_proj", "v_proj"],
                                         kasa_config=KasaConfig())
    ours, base = merge_matches_peft(tmp_path, base_dir, adapter_dir)
    assert run_cli("validate", adapter_dir).returncode == 0
    # svd/convert/combine/resize would drop lora_diag: they refuse
    assert_clean_error(run_cli("svd", adapter_dir), "kasa")
    assert_clean_error(run_cli("resize", adapter_dir, tmp_path / "r", "--rank", "1"), "kasa")
    assert not (tmp_path / "r").exists()


def test_mica_is_plain_lora(tmp_path):
    base_dir, adapter_dir = peft_adapter(tmp_path, lambda: build_base("llama"), target_modules=["q_proj"], init_lora_weights="mica")
    merge_matches_peft(tmp_path, base_dir, adapter_dir)


def _lora_config(name, **kwargs):
    import peft.tuners.lora.config as lora_config

    return getattr(lora_config, name)(**kwargs)


@pytest.mark.parametrize("variant,config,message", [
    ("qalora", lambda: {"use_qalora": True}, "unsupported LoRA variant qalora"),
    ("alora", lambda: {"alora_invocation_tokens": [3, 4]}, "aLoRA"),
    ("layer_replication", lambda: {"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
])
def test_variants_that_cannot_be_merged_are_refused(tmp_path, variant, config, message):
    kwargs = {"target_modules": ["q_proj"], **config()}
    base_dir, adapter_dir = peft_adapter(tmp_path, lambda: build_base("llama"), **kwargs)
    assert_clean_error(run_cli("merge", base_dir, adapter_dir, tmp_path / "out"), message, code=1)
    assert not (tmp_path / "out").exists()
    result = run_cli("validate", adapter_dir, "--json")  # PEFT's own tensors are not "unknown" or malformed
    findings = [f for r in json.loads(result.stdout)["results"] for f in r["findings"] if f["severity"] == "error"]
    assert result.returncode == 1 and [f["code"] for f in findings] == ["unsupported"], findings


def test_base_modifying_init_is_refused(tmp_path):
    adapter = tmp_path / "pissa"
    import shutil

    shutil.copytree(ADAPTERS / "llama-basic", adapter)
    edit_config(adapter, lambda c: {**c, "init_lora_weights": "pissa_niter_4"})
    assert_clean_error(run_cli("merge", BASES / "llama", adapter, tmp_path / "out"), "pissa_niter_4")
    assert not (tmp_path / "out").exists()


def _copy(tmp_path, name="llama-basic"):
    import shutil

    dst = tmp_path / name
    shutil.copytree(ADAPTERS / name, dst)
    return dst


def test_unknown_tensors_are_refused_by_every_writing_command(tmp_path):
    adapter = _copy(tmp_path)
    stray = "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"
    replace_tensors(adapter, lambda t: {**t, stray: torch.ones(2, 2)})
    for args in (
        ("merge", BASES / "llama", adapter, tmp_path / "o"),
        ("convert", adapter, tmp_path / "o", "--drop-unmapped"),
        ("combine", adapter, ADAPTERS / "llama-basic", "--out", tmp_path / "o"),
        ("resize", adapter, tmp_path / "o", "--rank", "1"),
    ):
        assert_clean_error(run_cli(*args), stray)
        assert not (tmp_path / "o").exists()


def test_non_finite_values_are_refused(tmp_path):
    adapter = _copy(tmp_path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def poison(t):
        t[key][0, 0] = float("nan")
        return t

    replace_tensors(adapter, poison)
    assert_clean_error(run_cli("merge", BASES / "llama", adapter, tmp_path / "o"), "NaN or Inf", key)
    assert_clean_error(run_cli("merge", BASES / "llama", ADAPTERS / "llama-basic", tmp_path / "o", "--scale", "nan"), "finite", code=2)
    assert_clean_error(run_cli("combine", ADAPTERS / "llama-basic", ADAPTERS / "llama-basic", "--out", tmp_path / "o",
                               "--weights", "1,inf"), "finite", code=2)
    assert not (tmp_path / "o").exists()


def test_huge_alpha_is_refused_and_overflow_is_never_written(tmp_path):
    adapter = _copy(tmp_path)
    edit_config(adapter, lambda c: {**c, "lora_alpha": 1e308})
    assert_clean_error(run_cli("merge", BASES / "llama", adapter, tmp_path / "o"), "lora_alpha")
    # A large but legal scaling overflows a float16 base: refused, nothing written.
    base = tmp_path / "fp16"
    build_base("llama").to(torch.float16).save_pretrained(str(base))
    edit_config(adapter, lambda c: {**c, "lora_alpha": 1e9})
    assert_clean_error(run_cli("merge", base, adapter, tmp_path / "o"), "not finite")
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_target_modules_null_is_valid(tmp_path):
    adapter = _copy(tmp_path)
    edit_config(adapter, lambda c: {**c, "target_modules": None})
    result = run_cli("validate", adapter, "--json")
    assert result.returncode == 0, result.stdout
    assert loratools.load_adapter(adapter).modules


def tiny_bigcode():
    import transformers as tf

    torch.manual_seed(0)
    return tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=32)).eval()


def test_starcoder_gpt2_names_with_linear_layers_merge_as_peft(tmp_path):
    """gpt_bigcode names its modules like GPT-2 (c_attn, c_proj, c_fc) but they are nn.Linear: the
    base's model_type decides the orientation; names alone never do."""
    base_dir, adapter_dir = peft_adapter(tmp_path, tiny_bigcode, target_modules=["c_attn", "c_proj", "c_fc"], task_type="CAUSAL_LM")
    info = json.loads(run_cli("info", "--json", adapter_dir).stdout)
    assert info["architecture"] is None and "gpt_bigcode" in info["architecture_note"]
    ours, base = merge_matches_peft(tmp_path, base_dir, adapter_dir)
    # attn.c_proj is square: read as GPT-2's Conv1D it would merge transposed without any shape error
    square = "transformer.h.0.attn.c_proj.weight"
    delta = loratools.load_adapter(adapter_dir).for_model_type("gpt_bigcode").delta("transformer.h.0.attn.c_proj")
    torch.testing.assert_close(ours[square], base[square] + delta, rtol=1e-6, atol=1e-6)
    # With no config.json beside the weights nothing says which it is: refused, not guessed.
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((base_dir / "model.safetensors").read_bytes())
    assert_clean_error(run_cli("merge", bare, adapter_dir, tmp_path / "o.safetensors"), "refusing to guess")
    assert run_cli("validate", adapter_dir, "--base", base_dir).returncode == 0


def test_a_gpt2_adapter_is_refused_by_a_starcoder_base(tmp_path):
    base = tmp_path / "bigcode"
    tiny_bigcode().save_pretrained(str(base))
    result = run_cli("merge", base, ADAPTERS / "gpt2-conv1d", tmp_path / "o")
    assert_clean_error(result, "the adapter is for gpt2 but the base is gpt_bigcode")
    assert "base-architecture" in run_cli("validate", "--json", ADAPTERS / "gpt2-conv1d", "--base", base).stdout


def tiny_qwen2():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2)
    return tf.Qwen2ForCausalLM(cfg).eval()


def test_family_from_the_base_the_adapter_names(tmp_path):
    """PEFT records no model class when task_type is set; the base named by base_model_name_or_path,
    if this machine has its config.json (a local directory or the Hub cache), says the family."""
    from tests.hub_cache import add_snapshot

    base_dir, adapter_dir = peft_adapter(tmp_path, tiny_qwen2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    info = lambda env=None: json.loads(run_cli("info", "--json", adapter_dir, env=env).stdout)  # noqa: E731
    edit_config(adapter_dir, lambda c: {**c, "base_model_name_or_path": "nowhere/qwen-tiny"})
    alone = info()
    assert (alone["architecture"], alone["family_known"], alone["naming"]) == ("llama", False, "llama")
    assert "qwen2" in alone["architecture_note"]
    edit_config(adapter_dir, lambda c: {**c, "base_model_name_or_path": str(base_dir)})
    assert (info()["architecture"], info()["family_known"]) == ("qwen2", True)
    cache = tmp_path / "hub"
    add_snapshot(cache, "acme/qwen-tiny", "a" * 40, {"config.json": base_dir / "config.json"})
    edit_config(adapter_dir, lambda c: {**c, "base_model_name_or_path": "acme/qwen-tiny"})
    assert info({"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})["architecture"] == "qwen2"
    merge_matches_peft(tmp_path, base_dir, adapter_dir)
    # A base of another family is refused once the family is known.
    llama_base = tmp_path / "llama"
    build_base("llama").save_pretrained(str(llama_base))
    edit_config(adapter_dir, lambda c: {**c, "base_model_name_or_path": str(base_dir)})
    assert_clean_error(run_cli("merge", llama_base, adapter_dir, tmp_path / "o"), "qwen2", "llama")


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float8_e4m3fn])
def test_quantized_base_weights_are_reported_alike_by_validate_and_merge(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    import shutil

    shutil.copytree(BASES / "llama", base)
    tensors = load_file(str(base / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(dtype) if dtype.is_floating_point else tensors[name].flatten()[: tensors[name].numel() // 2].to(dtype)
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    merged = run_cli("merge", base, ADAPTERS / "llama-basic", tmp_path / "out")
    assert_clean_error(merged, "only float16/bfloat16/float32/float64 bases can be merged")
    report = json.loads(run_cli("validate", "--json", ADAPTERS / "llama-basic", "--base", base).stdout)
    findings = report["results"][0]["findings"]
    assert [f["code"] for f in findings] == ["base-dtype"]
    assert findings[0]["message"].split(": ", 1)[1] in merged.stderr


def test_validate_base_runs_merges_own_plan(tmp_path):
    """Token rows beyond the base's vocabulary: fine on its own, refused against this base by
    validate --base exactly as merge refuses it."""
    base_dir, adapter_dir = peft_adapter(tmp_path, lambda: build_base("llama"), target_modules=["q_proj"],
                                         trainable_token_indices=[1, 5, 7])
    edit_config(adapter_dir, lambda c: {**c, "trainable_token_indices": [1, 5, 70]})
    assert run_cli("validate", adapter_dir).returncode == 0
    result = run_cli("validate", "--json", adapter_dir, "--base", base_dir)
    findings = json.loads(result.stdout)["results"][0]["findings"]
    assert result.returncode == 1 and [f["code"] for f in findings] == ["base-merge"]
    merged = run_cli("merge", base_dir, adapter_dir, tmp_path / "out")
    assert_clean_error(merged, "up to token 70")
    assert findings[0]["message"] in merged.stderr


@pytest.mark.parametrize("how", [{"target_modules": ["q_proj", "embed_tokens"]},
                                 {"target_modules": ["q_proj", "lm_head"]},
                                 {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]}])
def test_ensure_weight_tying_embedding_merges_as_the_peft_model_computes(tmp_path, how):
    """PEFT ties the head's adapter to the embedding's and saves both copies. The PEFT model applies
    the change once to the shared weight; merge_and_unload adds a tied LoRA twice (PEFT #2777).
    loratools merges what the model computes: its logits equal the PEFT model's."""
    import transformers

    from tests.peft_ref import outputs, peft_model

    base_dir, adapter_dir = peft_adapter(tmp_path, tied_llama, ensure_weight_tying=True, **how)
    out = tmp_path / "out"
    result = run_cli("merge", base_dir, adapter_dir, out)
    assert result.returncode == 0, result.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(outputs(merged, "llama"), outputs(peft_model(tied_llama, adapter_dir), "llama"), atol=1e-5, rtol=1e-4)
    assert run_cli("validate", adapter_dir, "--base", base_dir).returncode == 0
