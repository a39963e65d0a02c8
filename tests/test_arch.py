"""Architecture tables and detection, on the module names real transformers models have."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from loratools.arch import Layout, Role, detect_from_config, detect_from_paths, get_architecture, locate
from tests.conftest import BASES

SMALL = dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=4)


def _llama():
    return tf.LlamaConfig(hidden_size=16, intermediate_size=24, num_key_value_heads=2, **SMALL)


def _gpt2():
    return tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=32)


def _bert():
    return tf.BertConfig(hidden_size=16, intermediate_size=24, max_position_embeddings=32, **SMALL)


def _llama_like(config_cls):
    return lambda: config_cls(hidden_size=16, intermediate_size=24, num_key_value_heads=2, head_dim=4, **SMALL)


# (model class, config, family, head, prefix, what module names alone say: the family, or the
# first family of a shared naming scheme, or None where families that share the names store
# the weights differently)
CASES = [
    (tf.LlamaForCausalLM, _llama, "llama", "causal-lm", "model.", "llama"),
    (tf.LlamaForSequenceClassification, _llama, "llama", "sequence-classification", "model.", "llama"),
    (tf.LlamaModel, _llama, "llama", "base", "", "llama"),
    (tf.MistralForCausalLM, _llama_like(tf.MistralConfig), "mistral", "causal-lm", "model.", "llama"),
    (tf.Qwen2ForCausalLM, _llama_like(tf.Qwen2Config), "qwen2", "causal-lm", "model.", "llama"),
    (tf.Qwen2ForSequenceClassification, _llama_like(tf.Qwen2Config), "qwen2", "sequence-classification", "model.", "llama"),
    (tf.Qwen3ForCausalLM, _llama_like(tf.Qwen3Config), "qwen3", "causal-lm", "model.", "llama"),
    (tf.GemmaForCausalLM, _llama_like(tf.GemmaConfig), "gemma", "causal-lm", "model.", "llama"),
    (tf.Gemma2ForCausalLM, _llama_like(tf.Gemma2Config), "gemma2", "causal-lm", "model.", "llama"),
    (tf.Gemma3ForCausalLM, _llama_like(tf.Gemma3TextConfig), "gemma3_text", "causal-lm", "model.", "llama"),
    (tf.Phi3ForCausalLM, lambda: tf.Phi3Config(hidden_size=16, intermediate_size=24, num_key_value_heads=2, pad_token_id=0, **SMALL),
     "phi3", "causal-lm", "model.", "phi3"),
    (tf.Starcoder2ForCausalLM, lambda: tf.Starcoder2Config(hidden_size=16, intermediate_size=24, num_key_value_heads=2, **SMALL),
     "starcoder2", "causal-lm", "model.", "starcoder2"),
    (tf.GPT2LMHeadModel, _gpt2, "gpt2", "causal-lm", "transformer.", None),
    (tf.GPT2ForSequenceClassification, _gpt2, "gpt2", "sequence-classification", "transformer.", None),
    (tf.GPT2Model, _gpt2, "gpt2", "base", "", None),
    (tf.GPTBigCodeForCausalLM, lambda: tf.GPTBigCodeConfig(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=32),
     "gpt_bigcode", "causal-lm", "transformer.", None),
    (tf.GPTNeoXForCausalLM, lambda: tf.GPTNeoXConfig(hidden_size=16, intermediate_size=24, **SMALL), "gpt_neox", "causal-lm", "gpt_neox.", "gpt_neox"),
    (tf.FalconForCausalLM, lambda: tf.FalconConfig(hidden_size=16, **SMALL), "falcon", "causal-lm", "transformer.", "falcon"),
    (tf.OPTForCausalLM, lambda: tf.OPTConfig(hidden_size=16, ffn_dim=24, word_embed_proj_dim=16, **SMALL), "opt", "causal-lm", "model.decoder.", "opt"),
    (tf.T5ForConditionalGeneration, lambda: tf.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=4),
     "t5", "seq2seq-lm", "", "t5"),
    (tf.BertForSequenceClassification, _bert, "bert", "sequence-classification", "bert.", "bert"),
    (tf.BertForMaskedLM, _bert, "bert", "masked-lm", "bert.", "bert"),
    (tf.BertModel, _bert, "bert", "base", "", "bert"),
]


def lora_targets(model) -> list[str]:
    """The module paths a LoRA could target: every Linear, Conv1D and Embedding."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


@pytest.mark.parametrize("cls,make_config,arch,head,prefix,by_names", CASES, ids=[c[0].__name__ for c in CASES])
def test_detects_every_family_and_head_class(cls, make_config, arch, head, prefix, by_names):
    model = cls(make_config())
    paths = lora_targets(model)
    # Exactly from the class name PEFT records in auto_mapping, or the base's model_type...
    detection = detect_from_paths(paths, class_name=cls.__name__)
    assert (detection.architecture, detection.head, detection.prefix, detection.family_known) == (arch, head, prefix, True)
    assert detection.unmatched == ()  # every Linear/Conv1D/Embedding of the model has a role
    by_type = detect_from_paths(paths, model_type=model.config.model_type)
    assert (by_type.architecture, by_type.prefix, by_type.family_known) == (arch, prefix, True)
    assert detect_from_config({"model_type": model.config.model_type, "architectures": [cls.__name__]}).architecture == arch
    # ... while names alone say only what they can.
    alone = detect_from_paths(paths)
    assert alone.architecture == by_names
    from loratools.arch import ARCHITECTURES

    alike = [a for a in ARCHITECTURES.values() if a.scheme == ARCHITECTURES[arch].scheme]
    assert alone.family_known == (len(alike) == 1)
    if by_names is None:
        assert alone.ambiguous_layout and "store these weights differently" in alone.reason


@pytest.mark.parametrize("cls,make_config,arch,head,prefix,by_names", CASES, ids=[c[0].__name__ for c in CASES])
def test_layout_matches_the_real_module_class(cls, make_config, arch, head, prefix, by_names):
    from transformers.pytorch_utils import Conv1D

    model = cls(make_config())
    for name, module in model.named_modules():
        ref = locate(arch, prefix, name)
        if ref is None:
            continue
        expected = Layout.CONV1D if isinstance(module, Conv1D) else Layout.EMBEDDING if isinstance(module, torch.nn.Embedding) else Layout.LINEAR
        assert ref.layout is expected, name


def test_same_leaf_name_different_roles():
    assert locate("gpt2", "transformer.", "transformer.h.3.attn.c_proj").role is Role.ATTN_OUT
    assert locate("gpt2", "transformer.", "transformer.h.3.mlp.c_proj").role is Role.FFN_DOWN
    bert = {
        "bert.encoder.layer.1.attention.output.dense": Role.ATTN_OUT,
        "bert.encoder.layer.1.intermediate.dense": Role.FFN_UP,
        "bert.encoder.layer.1.output.dense": Role.FFN_DOWN,
        "bert.pooler.dense": Role.POOLER,
    }
    for path, role in bert.items():
        ref = locate("bert", "bert.", path)
        assert ref.role is role and (ref.layer == 1 or role is Role.POOLER)
    fused = get_architecture("gpt2").template(Role.ATTN_QKV)
    assert fused.fused == (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V) and fused.layout is Layout.CONV1D


def test_unknown_architecture_is_not_guessed():
    detection = detect_from_paths(["model.blocks.0.attn.wqkv", "model.blocks.0.ffn.w1"])
    assert detection.architecture is None and "no module path" in detection.reason


def test_paths_of_two_families_equally_are_ambiguous():
    detection = detect_from_paths(["model.layers.0.self_attn.q_proj", "transformer.h.0.attn.c_attn"])
    assert detection.architecture is None and "store these weights differently" in detection.reason


def test_head_modules_alone_are_not_enough_to_guess():
    assert detect_from_paths(["lm_head"]).architecture is None
    assert detect_from_paths(["score", "classifier"]).architecture is None
    # ... unless PEFT recorded the model class, which is a fact, not a guess.
    detection = detect_from_paths(["lm_head"], class_name="GPT2LMHeadModel")
    assert (detection.architecture, detection.head, detection.unmatched) == ("gpt2", "causal-lm", ())


@pytest.mark.parametrize("family,head", [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("bert", "sequence-classification")])
def test_detect_from_base_config(family, head):
    config = json.loads((BASES / family / "config.json").read_text())
    detection = detect_from_config(config)
    assert (detection.architecture, detection.head) == (family, head)


def test_config_with_unknown_model_type():
    detection = detect_from_config({"model_type": "rwkv", "architectures": ["RwkvForCausalLM"]})
    assert detection.architecture is None and "rwkv" in detection.reason


def test_family_tables_live_in_arch_only():
    """No family name is spelled outside loratools/arch (the issue's rule: one place for them)."""
    import re
    from pathlib import Path

    import loratools
    from loratools.arch import ARCHITECTURES

    root = Path(loratools.__file__).parent
    names = "|".join(re.escape(n) for n in ARCHITECTURES)
    for path in root.rglob("*.py"):
        if "arch" in path.relative_to(root).parts:
            continue
        for line in path.read_text().splitlines():
            assert not re.search(rf"[\"']({names})[\"']", line), (path.name, line)
