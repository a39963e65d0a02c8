"""Multimodal (ConditionalGeneration) models: PEFT names the text decoder `model.language_model.…`
after transformers 5's module tree, while checkpoints — transformers 5.23's own save_pretrained
among them — keep the older layout (`language_model.model.…`, Qwen2-VL's `model.…`). loratools
merge finds the base tensors through transformers' renames (arch/renames.py), in either layout,
and OUT is what PEFT's merge_and_unload gives, loaded by transformers with the PEFT model's logits.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli
from tests import peft_merged
from tests.merged import assert_matches_peft, merged_tensors
from tests.peft_merged import randomise_b

VOCAB = 300
TEXT = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def tiny_config(model_type: str):
    """A tiny ConditionalGeneration config of the family (special tokens at the top of the vocabulary)."""
    if model_type == "gemma3":
        return tf.AutoConfig.for_model(
            "gemma3", text_config=dict(TEXT, head_dim=4, sliding_window=8),
            vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                               patch_size=8),
            mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)
    if model_type == "llava":
        return tf.AutoConfig.for_model(
            "llava", text_config=dict(TEXT, model_type="llama"),
            vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                               num_attention_heads=2, image_size=16, patch_size=8, projection_dim=16),
            image_token_index=299)
    if model_type == "mistral3":
        return tf.AutoConfig.for_model(
            "mistral3", text_config=dict(TEXT, model_type="mistral", head_dim=4),
            vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                               num_attention_heads=2, image_size=16, patch_size=8, head_dim=8),
            image_token_index=299)
    if model_type == "qwen2_5_vl":
        return tf.AutoConfig.for_model(
            "qwen2_5_vl", text_config=dict(TEXT, rope_scaling=dict(type="mrope", mrope_section=[1, 1, 0]),
                                           bos_token_id=0, eos_token_id=1),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=16, patch_size=4,
                               spatial_merge_size=1, temporal_patch_size=1, fullatt_block_indexes=[0]),
            image_token_id=299, video_token_id=298, vision_start_token_id=297)
    if model_type == "qwen2_vl":
        return tf.AutoConfig.for_model(
            "qwen2_vl", text_config=dict(TEXT, rope_scaling=dict(type="mrope", mrope_section=[1, 1, 0]),
                                         bos_token_id=0, eos_token_id=1),
            vision_config=dict(depth=1, embed_dim=16, hidden_size=16, mlp_ratio=2, num_heads=2, patch_size=4,
                               spatial_merge_size=1, temporal_patch_size=1),
            image_token_id=299, video_token_id=298, vision_start_token_id=297)
    raise ValueError(model_type)


FAMILIES = ("gemma3", "llava", "mistral3", "qwen2_vl", "qwen2_5_vl")
# The language model's attention and MLP (the vision tower's q_proj... excluded by the pattern).
TEXT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def build(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    return tf.AutoModelForImageTextToText.from_config(tiny_config(model_type)).eval()


def save_base(model_type: str, path, layout: str = "saved") -> None:
    """The tiny base as transformers 5.23's save_pretrained writes it ("saved": the older layout),
    or under the module tree's names, as transformers 4.52-4.57 saved it ("module-tree")."""
    model = build(model_type)
    model.save_pretrained(str(path))
    if layout == "module-tree":
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def make_adapter(model_type: str, base_dir, out, targets=TEXT_TARGETS, seed: int = 1) -> None:
    from peft import LoraConfig, get_peft_model

    model = tf.AutoModelForImageTextToText.from_pretrained(str(base_dir))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomise_b(peft, seed)
    peft.save_pretrained(str(out))


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 290, (2, 7), generator=torch.Generator().manual_seed(42))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def peft_reference(base_dir, adapter_dir, out_dir):
    return peft_merged.peft_reference(tf.AutoModelForImageTextToText, base_dir, adapter_dir, out_dir, inputs())


def check_out(out, reference: dict, logits: torch.Tensor) -> None:
    ours = merged_tensors(out)
    assert sorted(ours) == sorted(reference), set(ours) ^ set(reference)
    assert_matches_peft(ours, reference)
    loaded = tf.AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["saved", "module-tree"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_merge_equals_peft_in_either_checkpoint_layout(tmp_path, model_type, layout):
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    save_base(model_type, base, layout)
    make_adapter(model_type, base, adapter)
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert all(".model.language_model.layers." in k for k in keys)  # PEFT names the module tree
    stored = load_file(str(base / "model.safetensors"))
    assert any(k.startswith("model.language_model.layers.") for k in stored) == (layout == "module-tree")
    logits, reference = peft_reference(base, adapter, tmp_path / "ref")
    result = run_cli("merge", base, adapter, out)
    assert result.returncode == 0, result.stderr
    # OUT keeps the base's names, and so does transformers saving PEFT's merged model (it writes
    # back the layout it loaded).
    check_out(out, reference, logits)


def test_the_two_layouts_are_what_transformers_writes(tmp_path):
    """The premise: transformers 5.23 saves the older layout, and loads both."""
    save_base("gemma3", tmp_path / "a")
    save_base("qwen2_5_vl", tmp_path / "b")
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in load_file(str(tmp_path / "a" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(str(tmp_path / "b" / "model.safetensors"))
    names = dict(build("gemma3").named_modules())
    assert "model.language_model.layers.0.self_attn.q_proj" in names


@pytest.mark.parametrize("model_type", FAMILIES)
def test_all_linear_reaches_the_towers_and_merges(tmp_path, model_type):
    """all-linear also targets the vision tower and the projector (SigLIP, CLIP, Pixtral,
    Qwen2.5-VL's `visual`): found through the towers' renames (`vision_tower` -> `model.vision_tower`...)."""
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    save_base(model_type, base)
    make_adapter(model_type, base, adapter, targets="all-linear")
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(".vision_tower." in k or ".visual." in k for k in keys)
    logits, reference = peft_reference(base, adapter, tmp_path / "ref")
    result = run_cli("merge", base, adapter, out)
    assert result.returncode == 0, result.stderr
    check_out(out, reference, logits)


def test_dora_rslora_on_gemma3(tmp_path):
    """The shape of a public Unsloth Gemma 3 adapter: DoRA + rsLoRA on the language model."""
    from peft import LoraConfig, get_peft_model

    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    save_base("gemma3", base)
    peft = get_peft_model(tf.AutoModelForImageTextToText.from_pretrained(str(base)),
                          LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_TARGETS, use_dora=True, use_rslora=True))
    randomise_b(peft, 5)
    peft.save_pretrained(str(adapter))
    logits, reference = peft_reference(base, adapter, tmp_path / "ref")
    result = run_cli("merge", base, adapter, out)
    assert result.returncode == 0, result.stderr
    check_out(out, reference, logits)


# What PEFT on transformers < 4.52 named the text decoder (the module tree then).
OLDER_ADAPTER_PREFIX = {"llava": "base_model.model.language_model.model.", "gemma3": "base_model.model.language_model.model.",
                        "qwen2_5_vl": "base_model.model.model."}


@pytest.mark.parametrize("layout", ["saved", "module-tree"])
@pytest.mark.parametrize("model_type", sorted(OLDER_ADAPTER_PREFIX))
def test_adapter_in_the_older_layout_merges_the_same(tmp_path, model_type, layout):
    """An adapter made by PEFT on transformers 4.x names `language_model.model.layers…` (Qwen2-VL:
    `model.layers…`): the same modules, so the same OUT, byte for byte, on a base of either layout."""
    base, adapter, legacy = tmp_path / "base", tmp_path / "adapter", tmp_path / "legacy"
    save_base(model_type, base, layout)
    make_adapter(model_type, base, adapter)
    legacy.mkdir()
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k.replace("base_model.model.model.language_model.", OLDER_ADAPTER_PREFIX[model_type]): v
               for k, v in tensors.items()}, str(legacy / "adapter_model.safetensors"))
    (legacy / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    info = json.loads(run_cli("info", legacy, "--json").stdout)
    assert (info["architecture"], info["roles"].get("unknown")) == (model_type, None), info["roles"]
    assert run_cli("merge", base, adapter, tmp_path / "a").returncode == 0
    result = run_cli("merge", base, legacy, tmp_path / "b")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_info_and_validate_name_the_family(tmp_path, model_type):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    save_base(model_type, base)
    make_adapter(model_type, base, adapter)
    info = json.loads(run_cli("info", adapter, "--json").stdout)
    assert info["architecture"] == model_type
    roles = {m["role"] for m in info["modules"]} if "modules" in info else None
    if roles is not None:
        assert roles == {"attn_q", "attn_k", "attn_v", "attn_out", "ffn_gate", "ffn_up", "ffn_down"}
    result = run_cli("validate", adapter, "--base", base)
    assert result.returncode == 0, result.stdout + result.stderr


def _text_model(model_type: str, vlm):
    """The CausalLM that is `vlm`'s text decoder alone, holding the same weights."""
    cfg = vlm.config.text_config
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    model.model.load_state_dict(vlm.model.language_model.state_dict())
    model.lm_head.weight.data.copy_(vlm.lm_head.weight.data)
    return model


@pytest.mark.parametrize("model_type", ["gemma3", "mistral3"])
def test_text_adapter_on_the_multimodal_checkpoint_and_back(tmp_path, model_type):
    """A CausalLM adapter (`model.layers…`) merged into the multimodal checkpoint changes the same
    text tensors PEFT's merge changes in the CausalLM; and the multimodal adapter merged into the
    CausalLM's checkpoint gives PEFT's merge of it on the multimodal model, text part."""
    from peft import LoraConfig, PeftModel, get_peft_model

    vlm_dir, text_dir = tmp_path / "vlm", tmp_path / "text"
    save_base(model_type, vlm_dir)
    vlm = tf.AutoModelForImageTextToText.from_pretrained(str(vlm_dir)).eval()
    _text_model(model_type, vlm).save_pretrained(str(text_dir))
    # CausalLM adapter -> multimodal base
    text_adapter = tmp_path / "text-adapter"
    peft = get_peft_model(tf.AutoModelForCausalLM.from_pretrained(str(text_dir)),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]))
    randomise_b(peft, 3)
    peft.save_pretrained(str(text_adapter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(str(text_dir)), str(text_adapter)).merge_and_unload()
    want = {k: v for k, v in merged.state_dict().items() if k.startswith("model.")}
    result = run_cli("merge", vlm_dir, text_adapter, tmp_path / "out1")
    assert result.returncode == 0, result.stderr
    ours = merged_tensors(tmp_path / "out1")
    from loratools.arch.renames import checkpoint_name

    for name, tensor in want.items():
        stored = checkpoint_name(model_type, name.replace("model.", "model.language_model.", 1))
        torch.testing.assert_close(ours[stored], tensor, rtol=1e-6, atol=1e-6, msg=name)
    changed = [n for n in want if "proj" in n and not torch.equal(ours[checkpoint_name(model_type, n.replace("model.", "model.language_model.", 1))],
                                                                    vlm.state_dict()[n.replace("model.", "model.language_model.", 1)])]
    assert len(changed) == 10
    # multimodal adapter -> CausalLM base
    vlm_adapter = tmp_path / "vlm-adapter"
    make_adapter(model_type, vlm_dir, vlm_adapter)
    _, reference = peft_reference(vlm_dir, vlm_adapter, tmp_path / "ref")
    result = run_cli("merge", text_dir, vlm_adapter, tmp_path / "out2")
    assert result.returncode == 0, result.stderr
    ours = merged_tensors(tmp_path / "out2")
    for name, tensor in ours.items():
        if name.startswith("model."):
            stored = checkpoint_name(model_type, name.replace("model.", "model.language_model.", 1))
            torch.testing.assert_close(tensor, reference[stored], rtol=1e-6, atol=1e-6, msg=name)


def test_vision_modules_on_a_text_only_base_are_refused(tmp_path):
    vlm_dir, text_dir, adapter = tmp_path / "vlm", tmp_path / "text", tmp_path / "adapter"
    save_base("gemma3", vlm_dir)
    vlm = tf.AutoModelForImageTextToText.from_pretrained(str(vlm_dir)).eval()
    _text_model("gemma3", vlm).save_pretrained(str(text_dir))
    make_adapter("gemma3", vlm_dir, adapter, targets=["q_proj"])
    result = run_cli("merge", text_dir, adapter, tmp_path / "out")
    assert result.returncode != 0 and "vision_tower" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("layout", ["saved", "module-tree"])
def test_lora_on_a_tied_lm_head_unties_it_as_the_peft_model_does(tmp_path, layout):
    """Gemma 3 ties lm_head to the text decoder's embedding (stored once). A LoRA on lm_head alone
    changes the head in the PEFT model, not the embedding: OUT gets its own lm_head and a
    config.json that unties them (PEFT's merge_and_unload adds ΔW to the shared tensor instead,
    which changes the embedding too: not what the PEFT model computes)."""
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    save_base("gemma3", base, layout)
    make_adapter("gemma3", base, adapter, targets=["q_proj", "lm_head"])
    logits, _ = peft_reference(base, adapter, tmp_path / "ref")
    result = run_cli("merge", base, adapter, out)
    assert result.returncode == 0, result.stderr
    ours, stored = merged_tensors(out), load_file(str(base / "model.safetensors"))
    embed = next(k for k in stored if k.endswith("embed_tokens.weight") and "vision" not in k)
    assert torch.equal(ours[embed], stored[embed]) and "lm_head.weight" in ours
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False
    loaded = tf.AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, logits, rtol=1e-4, atol=1e-5)
