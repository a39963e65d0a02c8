"""Canonical roles a module plays in a transformer, independent of any naming scheme."""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_QKV = "attn_qkv"  # a fused q,k,v projection (GPT-2's c_attn)
    ATTN_OUT = "attn_out"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    FFN_GATE_UP = "ffn_gate_up"  # a fused gate+up projection (Phi-3's gate_up_proj)
    # Multi-head latent attention (DeepSeek-V2/V3): q and kv each go through a low-rank pair.
    ATTN_Q_A = "attn_q_a"  # q_a_proj: hidden -> q_lora_rank
    ATTN_Q_B = "attn_q_b"  # q_b_proj: q_lora_rank -> heads * q_head_dim
    ATTN_KV_A = "attn_kv_a"  # kv_a_proj_with_mqa: hidden -> kv_lora_rank + the shared rope key
    ATTN_KV_B = "attn_kv_b"  # kv_b_proj: kv_lora_rank -> heads * (k_nope + v)
    # Mixture of experts: one expert's projections (per-expert modules, or one expert's slice of a
    # fused 3-D parameter), and the router that scores the experts.
    EXPERT_GATE = "expert_gate"
    EXPERT_UP = "expert_up"
    EXPERT_DOWN = "expert_down"
    EXPERT_GATE_UP = "expert_gate_up"  # gate and up fused (transformers 5's experts.gate_up_proj)
    ROUTER = "router"  # mlp.gate / block_sparse_moe.gate / mlp.router; also a shared expert's gate
    CROSS_ATTN = "cross_attn"  # encoder-decoder attention (T5's decoder)
    TOKEN_EMBED = "token_embed"
    # Known modules with no counterpart in the other families (never converted).
    POS_EMBED = "pos_embed"
    TOKEN_TYPE_EMBED = "token_type_embed"
    LM_HEAD = "lm_head"
    LM_HEAD_TRANSFORM = "lm_head_transform"  # BERT's dense layer before the MLM decoder
    POOLER = "pooler"
    CLASSIFIER = "classifier"
    SSM_IN = "ssm_in"  # a Mamba mixer's input projection (x, z, B, C, dt stacked)
    SSM_OUT = "ssm_out"  # a Mamba mixer's output projection

    def __str__(self) -> str:  # print "attn_q", not "Role.ATTN_Q"
        return self.value


class Layout(str, Enum):
    """How the base weight is stored, which fixes the orientation of ΔW."""

    LINEAR = "linear"  # nn.Linear: weight (out, in); ΔW = s·B@A
    CONV1D = "conv1d"  # transformers' Conv1D: weight (in, out); ΔW = s·(B@A).T
    EMBEDDING = "embedding"  # nn.Embedding: weight (num, dim); ΔW = s·(B@A).T

    def __str__(self) -> str:
        return self.value

    @property
    def transposed(self) -> bool:
        """Whether the stored weight is LoRA's (out, in) orientation transposed: the one rule."""
        return self in (Layout.CONV1D, Layout.EMBEDDING)

    def lora_view(self, w):
        """W (or ΔW), a numpy array or torch tensor, in LoRA's (out, in) orientation, where ΔW =
        s·B@A; its own inverse, so it also turns an (out, in) result back into the stored one."""
        return w.T if self.transposed else w
