"""A tiny LLaMA (or Mixtral, which llama.cpp loads as LLaMA with experts) as a GGUF model llama.cpp loads, written with the gguf package from transformers
weights (what convert_hf_to_gguf.py does for LLaMA: its tensor names, q/k rows in rotary order,
a minimal SentencePiece-style vocabulary), so that a test can run llama.cpp itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k weights: each head's two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, out: Path) -> Path:
    import gguf

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)  # Mixtral: each expert's
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // heads)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(cfg.vocab_size)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<t{i}>" for i in range(3, cfg.vocab_size)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    experts = getattr(cfg, "num_local_experts", None)  # Mixtral, which llama.cpp loads as LLaMA
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        names = {k: v for k, v in names.items() if not k.startswith("mlp.")}
    for layer in range(cfg.num_hidden_layers):
        if experts:  # router (E, H); gate_up (E, 2I, H) split into gate and up; down (E, H, I)
            prefix = f"model.layers.{layer}.mlp."
            gate_up = state[prefix + "experts.gate_up_proj"]
            half = gate_up.shape[1] // 2
            writer.add_tensor(f"blk.{layer}.ffn_gate_inp.weight", state[prefix + "gate.weight"])
            writer.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", np.ascontiguousarray(gate_up[:, :half]))
            writer.add_tensor(f"blk.{layer}.ffn_up_exps.weight", np.ascontiguousarray(gate_up[:, half:]))
            writer.add_tensor(f"blk.{layer}.ffn_down_exps.weight", state[prefix + "experts.down_proj"])
        for hf, name in names.items():
            w = state[f"model.layers.{layer}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                w = rope_rows(w, heads)
            elif hf == "self_attn.k_proj":
                w = rope_rows(w, kv_heads)
            writer.add_tensor(f"blk.{layer}.{name}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
