"""Tiny, seeded random models of the three families, shared by the fixture script and the tests."""

from __future__ import annotations

import torch

BASES = ("llama", "gpt2", "bert")


def build_base(name: str, seed: int = 0):
    """A freshly initialised tiny model of the given family (deterministic for a given seed)."""
    import transformers as tf

    torch.manual_seed(seed)
    if name == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
        model = tf.LlamaForCausalLM(cfg)
    elif name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    elif name == "bert":
        cfg = tf.BertConfig(
            vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, num_labels=3,
        )
        model = tf.BertForSequenceClassification(cfg)
    else:
        raise ValueError(f"unknown tiny base {name!r}")
    return model.eval()


def save_llama_variant(path, **overrides) -> None:
    """The tiny LLaMA fixture's shape with some dimensions changed."""
    import transformers as tf

    torch.manual_seed(0)
    dims = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    tf.LlamaForCausalLM(tf.LlamaConfig(**(dims | overrides))).save_pretrained(str(path))
