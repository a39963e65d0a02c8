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


CASES = [
    (tf.LlamaForCausalLM, _llama, "llama", "causal-lm", "model."),
    (tf.LlamaForSequenceClassification, _llama, "llama", "sequence-classification", "model."),
    (tf.LlamaModel, _llama, "llama", "base", ""),
    (tf.GPT2LMHeadModel, _gpt2, "gpt2", "causal-lm", "transformer."),
    (tf.GPT2ForSequenceClassification, _gpt2, "gpt2", "sequence-classification", "transformer."),
    (tf.GPT2Model, _gpt2, "gpt2", "base", ""),
    (tf.BertForSequenceClassification, _bert, "bert", "sequence-classification", "bert."),
    (tf.BertForMaskedLM, _bert, "bert", "masked-lm", "bert."),
    (tf.BertModel, _bert, "bert", "base", ""),
]


def lora_targets(model) -> list[str]:
    """The module paths a LoRA could target: every Linear, Conv1D and Embedding."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


@pytest.mark.parametrize("cls,make_config,arch,head,prefix", CASES, ids=[c[0].__name__ for c in CASES])
def test_detects_every_family_and_head_class(cls, make_config, arch, head, prefix):
    model = cls(make_config())
    paths = lora_targets(model)
    # From the head's own modules (lm_head, score, classifier) alone where the class has them...
    detection = detect_from_paths(paths)
    assert (detection.architecture, detection.prefix) == (arch, prefix)
    assert detection.head == head
    # ... and exactly from the class name PEFT records in auto_mapping.
    assert detect_from_paths(paths, class_name=cls.__name__).head == head
    # Every path of the model's transformer blocks has a role (all Linear/Conv1D/Embedding are known).
    assert detection.unmatched == ()


@pytest.mark.parametrize("cls,make_config,arch,head,prefix", CASES, ids=[c[0].__name__ for c in CASES])
def test_layout_matches_the_real_module_class(cls, make_config, arch, head, prefix):
    from transformers.pytorch_utils import Conv1D

    model = cls(make_config())
    for name, module in model.named_modules():
        ref = locate(arch, prefix, name)
        if ref is None:
            continue
        expected = {torch.nn.Linear: Layout.LINEAR, Conv1D: Layout.CONV1D, torch.nn.Embedding: Layout.EMBEDDING}[type(module)]
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
    model = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=16, ffn_dim=24, word_embed_proj_dim=16, **SMALL))
    detection = detect_from_paths(lora_targets(model))
    assert detection.architecture is None and "no module path" in detection.reason
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=4))
    assert detect_from_paths(lora_targets(t5)).architecture is None


def test_paths_of_two_families_equally_are_ambiguous():
    detection = detect_from_paths(["model.layers.0.self_attn.q_proj", "transformer.h.0.attn.c_attn"])
    assert detection.architecture is None and "both" in detection.reason


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
    detection = detect_from_config({"model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    assert detection.architecture is None and "mistral" in detection.reason
