"""SGLang's LoRA loader, as rules (see runtimes/__init__.py for the shape).

Read from the sglang 0.5.23 wheel: python/sglang/srt/lora/lora.py (LoRAAdapter), lora_config.py,
lora_manager.py, mem_pool.py, utils.py, srt/arg_groups/fields/lora.py and srt/utils/common.py
(SUPPORTED_LORA_TARGET_MODULES). Only that release was read, so `--target sglang` is 0.5.23.

What it does with an adapter: it reads r, lora_alpha, target_modules, use_dora and peft_type from
adapter_config.json and nothing else; every module is scaled by lora_alpha / r and loaded into a
slot of r rows (the copy checks the shape); q/k/v_proj and gate/up_proj are stacked per layer into
qkv_proj and gate_up_proj; a tensor of a targeted module that is not lora_A goes to the lora_B slot.
"""

from __future__ import annotations

from . import Option, RankLimit, Rule, Runtime
from .common import (CONV_UNSERVED, FEATURE_UNREAD, FEATURES, FROM_CONV, FROM_DORA, FROM_INITIAL, IF_EMBEDDING_CHANGED,
                     INIT_UNREAD, MERGE, NO_CONVERSION, TO_PLAIN, TO_SCALING_1)

RELEASE = "0.5.23"

# utils.py get_normalized_target_modules: module names as SGLang's LoRA slots call them
NORMALIZED = {
    "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
    "vocab_emb": "embed_tokens", "embeddings": "embed_tokens", "word_embeddings": "embed_tokens", "output": "lm_head",
    "unembed_tokens": "lm_head", "q_a_proj": "fused_qkv_a_proj_with_mqa", "kv_a_proj_with_mqa": "fused_qkv_a_proj_with_mqa",
}
# utils.py _KNOWN_LORA_TARGET_MODULES: the (normalized) modules its memory pool has slots for
KNOWN_MODULES = frozenset({
    "qkv_proj", "qkvr", "o_proj", "wo_ud", "out_proj", "in_proj", "in_proj_qkvz", "up_proj", "gate_up_proj", "down_proj",
    "fc1_latent_proj", "fc2_latent_proj", "embed_tokens", "lm_head", "fused_qkv_a_proj_with_mqa", "q_b_proj", "kv_b_proj",
    "indexer.wq_b", "indexer.wk", "indexer.weights_proj",
})
# lora.py normalize_qkv_proj / normalize_gate_up_proj: (stacked slot, its parts, the parts a layer must have
# when it has any of them): q_proj without v_proj fails (no v to stack), k/v_proj without q_proj and up_proj
# without gate_proj match no slot.
STACKED = (
    ("qkv_proj", ("q_proj", "k_proj", "v_proj"), ("q_proj", "v_proj")),
    ("gate_up_proj", ("gate_proj", "up_proj"), ("gate_proj",)),
)
RANKS = RankLimit(None, None, "r")  # any --max-lora-rank; by default the largest r of --lora-paths

_SRC = "python/sglang/srt/lora/"

RULES = (
    Rule("sglang-peft-type", "peft_type", "error", "asserts peft_type LORA, so it refuses {peft_type}",
         TO_PLAIN, _SRC + "lora.py LoRAAdapter"),
    Rule("sglang-dora", "dora", "error", "refuses DoRA adapters (use_dora)", FROM_DORA,
         _SRC + "lora_manager.py validate_new_adapter"),
    Rule("sglang-scaling", "own_scaling", "error",
         "scales every module by lora_alpha/r = {served:g} (it reads neither use_rslora nor rank/alpha patterns): {n} "
         "module(s) would be served with the wrong scaling, e.g. {module} at {served:g} instead of {own:g}",
         TO_SCALING_1, _SRC + "lora.py LoRAAdapter.scaling",
         param="r"),
    Rule("sglang-rank", "mixed_ranks", "error",
         "loads every module into a slot of r={r} rows and checks the shape: {n} module(s) of another rank "
         "(rank_pattern) make the adapter fail to load, e.g. {module} (rank {rank})",
         "no loratools command pads a module to another rank; " + MERGE, _SRC + "mem_pool.py load_lora_weight_to_buffer"),
    Rule("sglang-target-modules", "unknown_modules", "error",
         "has LoRA slots only for {known}: it cannot serve LoRA on {modules}",
         "serve it with vLLM or PEFT; or " + MERGE,
         _SRC + "utils.py _KNOWN_LORA_TARGET_MODULES, get_normalized_target_modules", param=(NORMALIZED, KNOWN_MODULES)),
    Rule("sglang-conv", "conv", "error", CONV_UNSERVED, FROM_CONV, _SRC + "layers.py get_lora_layer, mem_pool.py",
         param="its parallel linear layers (column, row, QKV, merged) and the vocabulary embedding"),
    Rule("sglang-target-modules", "target_modules_string", "error",
         "reads target_modules as a list of module names, 'all' or 'all-linear', and refuses {value!r}",
         "list the module names in adapter_config.json's target_modules (loratools info ADAPTER prints them)",
         _SRC + "lora_manager.py init_lora_shapes, utils.py get_normalized_target_modules", param=("all", "all-linear")),
    Rule("sglang-stacked", "stacked", "error",
         "stacks {parts} into {slot} in every layer and needs {needed} there: {n} layer(s) lack them, e.g. {module} has "
         "{present} but not {missing}, so the adapter fails to load",
         "no loratools command adds the missing projection; retrain with {needed}, or " + MERGE,
         _SRC + "lora.py normalize_qkv_proj, normalize_gate_up_proj, mem_pool.py", param=STACKED),
    Rule("sglang-bias", "bias", "error",
         "does not read bias={bias!r}, so the trained biases are not served: those of LoRA modules go to the lora_B slot, "
         "where lora_B.weight replaces them, and any other matches no slot and fails the load", MERGE,
         _SRC + "mem_pool.py load_lora_weight_to_buffer"),
    Rule("sglang-tensor", "lora_bias", "error",
         "does not read lora_bias: lora_B.bias goes to the lora_B slot and lora_B.weight (read after it) replaces it, "
         "so the bias of {n} module(s), e.g. {module}, is dropped", MERGE,
         _SRC + "mem_pool.py load_lora_weight_to_buffer"),
    Rule("sglang-tensor", "tensors", "error",
         "puts {what} ({n} tensor(s), e.g. {key}) in the lora_B slot, whose shape check then fails", MERGE,
         _SRC + "mem_pool.py load_lora_weight_to_buffer", param=("lora_diag",)),
    Rule("sglang-tensor", "tensors", "error",
         "does not load {what} ({n} tensor(s), e.g. {key}): the trained token rows are not served", MERGE,
         _SRC + "lora.py _process_weight, mem_pool.py", param=("trainable tokens",)),
    Rule("sglang-modules-to-save", "modules_to_save", "error",
         "does not read modules_to_save: the saved modules ({modules}) are not served", MERGE,
         _SRC + "lora.py _process_weight, lora_config.py"),
    Rule("sglang-saved-embedding", "saved_embedding", "warning",
         "loads only the LoRA factors of an embedding, not the saved embedding weights ({key}): it serves the base "
         "model's own embedding", IF_EMBEDDING_CHANGED,
         _SRC + "mem_pool.py load_lora_weight_to_buffer"),
    Rule("sglang-init", "init_unread", "warning", INIT_UNREAD, FROM_INITIAL, _SRC + "lora_config.py"),
    Rule("sglang-feature", "features", "error", FEATURE_UNREAD, NO_CONVERSION, _SRC + "lora_config.py", param=FEATURES),
    # its MoE LoRA path (fused or per-expert) was not read
    Rule("sglang-experts", "experts_any", "warning",
         "is not checked by loratools for LoRA on MoE experts ({what} module(s), e.g. {module})",
         "try it on the server; or " + MERGE, "(not read)"),
)

OPTIONS = (
    Option("--max-lora-rank", "rank", "the LoRA slot size (any integer; by default the largest r of --lora-paths)",
           "python/sglang/srt/arg_groups/fields/lora.py, lora/mem_pool.py can_support", param=RANKS),
    Option("--lora-target-modules", "modules",
           "the modules given LoRA slots (by default those of --lora-paths); adapters loaded later must fit them",
           "python/sglang/srt/arg_groups/fields/lora.py, lora/lora_manager.py init_lora_shapes"),
)

SGLANG = Runtime("sglang", "SGLang", (RELEASE, RELEASE), RULES, OPTIONS, read=(RELEASE,))
