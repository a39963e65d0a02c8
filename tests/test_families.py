"""The 2025-26 text families (MoE, MLA and the rest): `info` names the family and the roles of
their modules (experts' shared MLPs, routers, MLA's low-rank pairs), and merge equals PEFT's
merge_and_unload saved by transformers, loaded with the PEFT model's logits. Experts fused into
3-D parameters (target_parameters) are another module's business (arch/experts.py)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from tests.conftest import run_cli
from tests.merged import assert_matches_peft, merged_tensors
from tests.peft_merged import peft_reference, randomise_b

S = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
CONFIGS = {
    "qwen2_moe": dict(S, **MOE, shared_expert_intermediate_size=8),
    "qwen3_moe": dict(S, **MOE, head_dim=4),
    "mixtral": dict(S, num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(S, num_local_experts=4, num_experts_per_tok=2, head_dim=4, layer_types=["sliding_attention", "full_attention"]),
    "deepseek_v3": dict(S, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=1,
                        first_k_dense_replace=1, q_lora_rank=8, num_key_value_heads=4, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
                        v_head_dim=4, n_group=1, topk_group=1),
    "glm4": dict(S, head_dim=4, pad_token_id=0),
    "glm4_moe": dict(S, pad_token_id=0, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=1,
                     first_k_dense_replace=1, head_dim=4, n_group=1, topk_group=1),
    "granite": dict(S),
    "olmo2": dict(S, eos_token_id=1, pad_token_id=0),
    "llama4_text": dict(S, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=24, head_dim=4,
                        interleave_moe_layer_step=2, no_rope_layers=[1, 1]),
}
ATTENTION = {"deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]}
# The roles an all-linear adapter has in each family (all nn.Linear but lm_head).
ALL_LINEAR_ROLES = {
    "qwen2_moe": {"attn_q", "attn_k", "attn_v", "attn_out", "ffn_gate", "ffn_up", "ffn_down", "router"},
    "qwen3_moe": {"attn_q", "attn_k", "attn_v", "attn_out"},
    "mixtral": {"attn_q", "attn_k", "attn_v", "attn_out"},
    "gpt_oss": {"attn_q", "attn_k", "attn_v", "attn_out"},
    "deepseek_v3": {"attn_q_a", "attn_q_b", "attn_kv_a", "attn_kv_b", "attn_out"},
    "glm4": {"attn_q", "attn_k", "attn_v", "attn_out", "ffn_gate_up", "ffn_down"},
    "glm4_moe": {"attn_q", "attn_k", "attn_v", "attn_out"},
    "granite": {"attn_q", "attn_k", "attn_v", "attn_out", "ffn_gate", "ffn_up", "ffn_down"},
    "olmo2": {"attn_q", "attn_k", "attn_v", "attn_out", "ffn_gate", "ffn_up", "ffn_down"},
    "llama4_text": {"attn_q", "attn_k", "attn_v", "attn_out", "ffn_gate", "ffn_up", "ffn_down", "router"},
}


def save_base(family: str, path) -> None:
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(family, **CONFIGS[family])).save_pretrained(str(path))


def make_adapter(base, out, targets, seed: int = 1) -> None:
    """targets "linear": every nn.Linear but lm_head, by full name (PEFT's "all-linear" would also
    reach fused experts through target_parameters); "linear-but-router": without Llama 4's router
    (a Linear whose forward returns a tuple: PEFT's LoRA layer cannot wrap it)."""
    from peft import LoraConfig, get_peft_model

    model = tf.AutoModelForCausalLM.from_pretrained(str(base))
    if targets in ("linear", "linear-but-router"):
        # (DeepSeek-V3 and GLM-4-MoE without their MLPs: PEFT 0.21 turns a target named like an
        # expert's projection into target_parameters on the fused experts)
        moe_named = model.config.model_type in ("deepseek_v3", "glm4_moe")
        targets = [n for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n != "lm_head" and not (moe_named and ".mlp." in n)
                   and not (targets == "linear-but-router" and n.endswith("router"))]
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomise_b(peft, seed)
    peft.save_pretrained(str(out))


def inputs():
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(42))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def assert_merge_equals_peft(base, adapter, out, ref) -> None:
    """`loratools merge` writes PEFT's merge_and_unload (saved by transformers), and transformers
    loads OUT with the PEFT model's logits."""
    logits, reference = peft_reference(tf.AutoModelForCausalLM, base, adapter, ref, inputs())
    result = run_cli("merge", base, adapter, out)
    assert result.returncode == 0, result.stderr
    ours = merged_tensors(out)
    assert sorted(ours) == sorted(reference)
    assert_matches_peft(ours, reference)
    loaded = tf.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_info_reports_family_and_roles(tmp_path, family):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    save_base(family, base)
    make_adapter(base, adapter, "linear")
    info = json.loads(run_cli("info", adapter, "--json").stdout)
    assert info["architecture"] == family and info["family_known"], info["architecture"]
    assert set(info["roles"]) == ALL_LINEAR_ROLES[family], info["roles"]


MERGED = ["qwen2_moe", "mixtral", "gpt_oss", "deepseek_v3", "glm4", "glm4_moe", "olmo2", "granite", "llama4_text"]


@pytest.mark.parametrize("family", MERGED)
def test_merge_equals_peft(tmp_path, family):
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    save_base(family, base)
    make_adapter(base, adapter, "linear-but-router" if family == "llama4_text" else "linear")
    assert_merge_equals_peft(base, adapter, out, tmp_path / "ref")


def test_attention_only_adapter_on_a_moe_base_without_a_recorded_class(tmp_path):
    """Names alone fit LLaMA's scheme; the base's config.json decides the family and merge takes it."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    save_base("qwen3_moe", base)
    make_adapter(base, adapter, ["q_proj", "v_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.pop("auto_mapping", None)
    config["base_model_name_or_path"] = "somebody/tiny-qwen3-moe"  # not a local directory: no config.json to read
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert json.loads(run_cli("info", adapter, "--json").stdout)["family_known"] is False
    result = run_cli("merge", base, adapter, tmp_path / "out")
    assert result.returncode == 0, result.stderr


def test_per_expert_modules_have_expert_roles():
    from loratools.arch import locate

    assert locate("qwen3_moe", "model.", "model.layers.1.mlp.experts.3.gate_proj").role.value == "expert_gate"
    assert locate("mixtral", "model.", "model.layers.0.block_sparse_moe.experts.7.w2").role.value == "expert_down"
    assert locate("mixtral", "model.", "model.layers.0.block_sparse_moe.gate").role.value == "router"
    assert locate("deepseek_v3", "model.", "model.layers.1.mlp.shared_experts.up_proj").role.value == "ffn_up"


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe"])
def test_peft_all_linear_on_moe_merges_experts_and_router(tmp_path, family):
    """PEFT's own `target_modules="all-linear"` on a transformers 5 MoE model targets the attention
    by module and the experts and router by parameter (`target_parameters` of bare names such as
    `down_proj` and `gate.weight`): a bare `down_proj` is the experts module's parameter, never an
    attention module's. OUT equals PEFT's merge and gives the PEFT model's logits."""
    from peft import LoraConfig, get_peft_model

    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    save_base(family, base)
    peft = get_peft_model(tf.AutoModelForCausalLM.from_pretrained(str(base)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomise_b(peft, 1)
    peft.save_pretrained(str(adapter))
    assert json.loads((adapter / "adapter_config.json").read_text())["target_parameters"]  # what makes the case
    assert_merge_equals_peft(base, adapter, out, tmp_path / "ref")


def test_llama4_fused_experts_stored_fused_merge(tmp_path):
    """Llama 4 stores its experts fused on disk, as in memory ((E, hidden, 2·inter) with no
    `is_transposed`): a target_parameters adapter's ΔW_e goes into expert e's slice as PEFT computes it."""
    from peft import LoraConfig, get_peft_model

    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    save_base("llama4_text", base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        target_parameters=["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"])
    peft = get_peft_model(tf.AutoModelForCausalLM.from_pretrained(str(base)), config)
    randomise_b(peft, 1)
    peft.save_pretrained(str(adapter))
    assert_merge_equals_peft(base, adapter, out, tmp_path / "ref")
