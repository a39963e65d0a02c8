"""vLLM's LoRA loader, as rules (see runtimes/__init__.py for the shape).

Read from the released wheels: vllm/lora/peft_helper.py, lora_model.py (models.py in 0.10 to 0.12),
utils.py, lora_weights.py, worker_manager.py, config/lora.py (config.py in 0.10) and
engine/arg_utils.py of 0.10.0, 0.11.0, 0.11.1, 0.11.2, 0.12.0, 0.15.0, 0.17.0, 0.18.0, 0.18.1, 0.19.0,
0.20.0, 0.25.0, 0.28.0, 0.30.0, 0.31.0, 0.32.0 and 0.33.0. Every boundary below lies between two
consecutive releases that were both read:

- 0.11.1: bias other than "none" refused outright (before: with --enable-lora-bias, loaded as LoRA
  biases); lora_B.bias no longer loaded; --max-lora-rank 1 added.
- 0.12.0: a saved embedding (embed_tokens/lm_head .base_layer.weight) is skipped, no longer rejected.
- 0.19.0: --lora-target-modules.
- 0.31.0: modules_to_save "classifier"/"score" accepted (a classification head); lora_B.bias read
  as lora_B.
- 0.32.0: rank_pattern / alpha_pattern honoured per module (PEFT's first match) and --max-lora-rank
  sized by max(r, *rank_pattern.values()); lora_bias, base-modifying init_lora_weights, aLoRA,
  layer_replication, BD-LoRA and QALoRA refused.

MoE experts (the rules below marked MOE) were read from the 2026 sources of the 0.33 line only:
vllm/lora/model_manager.py (_create_lora_modules, _stack_moe_lora_weights), lora_model.py
(check_unexpected_modules) and the models' `is_3d_moe_weight`. A model whose vLLM class sets it
(FUSED_EXPERTS) gets FusedMoE3DWithLoRA, which reads PEFT's fused layout: `experts.base_layer` is
gate_up_proj and `experts` down_proj, A (r·E, in) viewed as (E, r, in) and B (out, r·E) as
(out, r, E), exactly PEFT's per-expert blocks, and both must be there (it asserts each). Every other
MoE model gets FusedMoEWithLoRA, which packs per-expert 2-D modules (experts.N.gate_proj/up_proj/
down_proj, or w1/w3/w2) and has no reading of a fused pair. Older releases are not checked for
experts (EXPERTS_UNCHECKED says so).
"""

from __future__ import annotations

from ..arch import family_from_evidence
from . import ExpertFamilies, Option, RankLimit, Rule, Runtime
from .common import (CONV_UNSERVED, FEATURE_UNREAD, FEATURES, FROM_CONV, FROM_DORA, FROM_INITIAL, IF_EMBEDDING_CHANGED,
                     INIT_UNREAD, MERGE, NO_CONVERSION, TO_PLAIN, TO_SCALING_1)

OLDEST, NEWEST = "0.10.0", "0.33.0"

_MAX_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
RANKS_0_10 = RankLimit(_MAX_RANKS, 16, "r+modules")  # rank 1 not yet a choice
RANKS_0_11_1 = RankLimit((1, *_MAX_RANKS), 16, "r+modules")  # only r is checked; tensors must fit the slots
RANKS_0_32 = RankLimit((1, *_MAX_RANKS), 16, "r+rank_pattern")  # validate_legal: max(r, *rank_pattern.values())

# init_lora_weights strings PEFTHelper accepts (0.32.0 on); any other string is refused.
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
CLASSIFIER_HEADS = ("classifier", "score")


# --max-lora-rank over the releases: (limit, source, since, until)
RANK_LIMITS = (
    (RANKS_0_10, "vllm/config.py LoRAConfig (0.10.0), config/lora.py (0.11.0), peft_helper.py validate_legal", None, "0.11.1"),
    (RANKS_0_11_1, "vllm/config/lora.py MaxLoRARanks, peft_helper.py validate_legal", "0.11.1", "0.32.0"),
    (RANKS_0_32, "vllm/config/lora.py MaxLoRARanks, peft_helper.py validate_legal", "0.32.0", None),
)


def _rank_rules(limit: RankLimit, source: str, since: str | None, until: str | None) -> tuple[Rule, Rule]:
    return (
        Rule("vllm-rank", "rank_over_default", "warning",
             "cannot serve rank {rank} ({counted}) at its default --max-lora-rank {default}",
             "start it with --max-lora-rank {flag}", source, since, until, limit),
        Rule("vllm-rank", "rank_over_max", "error", "cannot serve rank {rank} ({counted}): its largest --max-lora-rank is {max}",
             "loratools resize ADAPTER OUT --rank {max} (the best rank-{max} approximation); or " + MERGE,
             source, since, until, limit),
    )


# MOE: the vLLM model classes with is_3d_moe_weight = True (vLLM's fact), each with the name messages
# give it. A base's config.json names its family by model_type: for a class loratools has a family
# of, that family's name (arch/ holds it); the others are transformers' model_types of those classes.
_3D_MOE_CLASSES = {
    "GptOssForCausalLM": None, "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",
    "Qwen3VLMoeForConditionalGeneration": "qwen3_vl_moe", "Glm4MoeLiteForCausalLM": "glm4_moe_lite",
    "InternS1ProForConditionalGeneration": "InternS1Pro",
}
_3D_MOE_NAMES = {cls: name or family_from_evidence(class_name=cls).name for cls, name in _3D_MOE_CLASSES.items()}
FUSED_EXPERTS = ExpertFamilies(
    fused=frozenset({*_3D_MOE_CLASSES, *_3D_MOE_NAMES.values()}),
    fused_labels=tuple(_3D_MOE_NAMES.values()),
    pair=("gate_up_proj", "down_proj"),
)
MOE_READ = "0.33.0"  # the release line whose MoE LoRA loader was read
_MOE = "vllm/lora/model_manager.py"

_HELPER = "vllm/lora/peft_helper.py"
_PARSE = "vllm/lora/utils.py parse_fine_tuned_lora_name"

RULES = (
    Rule("vllm-peft-type", "peft_type", "error",
         "reads peft_type LORA tensors only; this is {peft_type}, whose lora_E it rejects as an unsupported LoRA weight",
         TO_PLAIN, _PARSE),
    Rule("vllm-dora", "dora", "error", "refuses DoRA adapters (use_dora)", FROM_DORA, f"{_HELPER} _validate_features"),
    Rule("vllm-modules-to-save", "modules_to_save", "error", "refuses modules_to_save ({modules})", MERGE,
         f"{_HELPER} _validate_features (0.30.0)", until="0.31.0"),
    Rule("vllm-modules-to-save", "modules_to_save", "error",
         "accepts modules_to_save only for a classification head named classifier or score, and refuses {modules}",
         MERGE, f"{_HELPER} _validate_features, utils.py parse_fine_tuned_lora_name", since="0.31.0",
         param=CLASSIFIER_HEADS),
    Rule("vllm-modules-to-save", "saved_modules", "error",
         "loads one saved classification module per adapter; this one saves {n} ({modules})", MERGE,
         "vllm/lora/lora_model.py from_lora_tensors", since="0.31.0", param=1),
    Rule("vllm-bias", "bias", "error",
         "refuses bias={bias!r} without --enable-lora-bias, and with it adds the trained biases to the base layer's own "
         "(it reads a .bias key as a LoRA bias) where PEFT replaces them", MERGE,
         f"{_HELPER} validate_legal, {_PARSE}, models.py (0.10.0, 0.11.0)", until="0.11.1"),
    Rule("vllm-bias", "bias", "error", "refuses bias={bias!r} (adapter bias is not supported)", MERGE,
         f"{_HELPER} validate_legal", since="0.11.1"),
    Rule("vllm-tensor", "lora_bias", "warning",
         "adds lora_B.bias ({n} module(s), e.g. {module}) only when started with --enable-lora-bias",
         "start vLLM with --enable-lora-bias", "vllm/lora/models.py activate_adapter (0.10.0, 0.11.0)",
         until="0.11.1", param="scaling 1"),
    Rule("vllm-tensor", "lora_bias", "error",
         "adds lora_B.bias unscaled (with --enable-lora-bias) where PEFT scales it with B: {n} module(s) would be served "
         "wrong, e.g. {module} (scaling {scaling:g})",
         "loratools convert ADAPTER OUT --to-lora (scaling 1 in every module, bias included), then --enable-lora-bias",
         "vllm/lora/lora_weights.py optimize, models.py activate_adapter (0.10.0, 0.11.0)", until="0.11.1",
         param="scaled"),
    Rule("vllm-tensor", "lora_bias", "error",
         "rejects lora_B.bias ({n} module(s), e.g. {module}) as an unsupported LoRA weight", MERGE, _PARSE,
         since="0.11.1", until="0.31.0"),
    Rule("vllm-tensor", "lora_bias", "error",
         "reads lora_B.bias as a lora_B and then replaces it with lora_B.weight (safetensors keys come sorted): the bias of "
         "{n} module(s), e.g. {module}, is dropped", MERGE, f"{_PARSE}, lora_model.py from_lora_tensors (0.31.0)",
         since="0.31.0", until="0.32.0"),
    Rule("vllm-tensor", "lora_bias", "error", "refuses lora_bias ({n} module(s), e.g. {module})", MERGE,
         f"{_HELPER} _validate_features", since="0.32.0"),
    Rule("vllm-tensor", "tensors", "error", "rejects {what} ({n} tensor(s), e.g. {key}) as an unsupported LoRA weight",
         MERGE, _PARSE, param=("lora_diag", "trainable tokens", "variant")),
    Rule("vllm-saved-embedding", "saved_embedding", "error",
         "rejects the saved embedding weights ({key}) as an unsupported LoRA weight", MERGE, f"{_PARSE} (0.11.2)",
         until="0.12.0"),
    Rule("vllm-saved-embedding", "saved_embedding", "warning",
         "skips the saved embedding weights ({key}) and serves the base model's own embedding",
         IF_EMBEDDING_CHANGED,
         "vllm/lora/utils.py is_base_embedding_weights, lora_model.py from_lora_tensors", since="0.12.0"),
    Rule("vllm-init", "init_unread", "warning", INIT_UNREAD, FROM_INITIAL, f"{_HELPER} (0.31.0: no such field)",
         until="0.32.0"),
    Rule("vllm-init", "init_refused", "error",
         "refuses init_lora_weights={init!r}: the adapter is relative to a base PEFT rewrote at initialisation",
         FROM_INITIAL, f"{_HELPER} _init_is_supported", since="0.32.0", param=PLAIN_INITS),
    Rule("vllm-feature", "features", "error", FEATURE_UNREAD, NO_CONVERSION, f"{_HELPER} (0.31.0: no such fields)",
         until="0.32.0", param=FEATURES),
    Rule("vllm-feature", "features", "error", "refuses {feature} ({key})", NO_CONVERSION,
         f"{_HELPER} _validate_features", since="0.32.0", param=FEATURES),
    Rule("vllm-scaling", "own_scaling", "error",
         "ignores rank_pattern and alpha_pattern (it honours them from 0.32.0) and scales every module by {served:g}: "
         "{n} module(s) would be served with the wrong scaling, e.g. {module} at {served:g} instead of {own:g}",
         TO_SCALING_1, f"{_HELPER} __post_init__, lora_weights.py from_config (0.31.0)", until="0.32.0", param="r, rsLoRA"),
    *(rule for limits in RANK_LIMITS for rule in _rank_rules(*limits)),
    # Every release read: the LoRA layer classes wrap its parallel linear layers (column, row, QKV, merged,
    # replicated), the vocabulary embedding, the logits processor and fused MoE; from_layer swaps a module
    # only for one of them, and a module it cannot swap fails the load as an unexpected module.
    Rule("vllm-conv", "conv", "error", CONV_UNSERVED, FROM_CONV,
         "vllm/lora/layers/__init__.py, utils.py from_layer (_all_lora_classes), lora_model.py check_unexpected_modules",
         param="linear layers, the vocabulary embedding, the LM head and fused MoE experts"),
    Rule("vllm-experts", "experts_any", "warning",
         f"is not checked by loratools for LoRA on MoE experts before {MOE_READ} ({{what}} module(s), e.g. {{module}})",
         "check with --target vllm@" + MOE_READ + " and the release's own loader", "(not read)", until=MOE_READ),
    Rule("vllm-experts", "fused_on_2d", "error",
         "holds the experts of {family} per expert (FusedMoEWithLoRA) and reads only per-expert 2-D LoRA modules "
         "there; fused target_parameters LoRA ({n} module(s), e.g. {module}) is read only for models with 3-D experts "
         "({fused}); the source read also has an opt-in mixed 2-D/3-D format (enable_mixed_moe_lora_format with a "
         "per-request is_3d_lora_weight), which loratools does not check",
         MERGE, f"{_MOE} _create_lora_modules, models' is_3d_moe_weight", since=MOE_READ, param=FUSED_EXPERTS),
    Rule("vllm-experts", "fused_family_unknown", "warning",
         "reads fused target_parameters LoRA on experts ({n} module(s)) only for models with 3-D experts ({fused}); "
         "the adapter does not record its base's family, so loratools cannot tell which this is",
         "validate it with --base BASE (its config.json gives the family)",
         f"{_MOE} _create_lora_modules, models' is_3d_moe_weight", since=MOE_READ, param=FUSED_EXPERTS),
    Rule("vllm-experts", "fused_unpaired", "error",
         "reads fused experts LoRA as a pair, experts.base_layer (gate_up_proj) and experts (down_proj), and asserts both: "
         "{n} experts module(s) have only {present}, e.g. {module}, so the adapter fails to load",
         "retrain with target_parameters on both {pair}; or " + MERGE,
         f"{_MOE} _stack_moe_lora_weights", since=MOE_READ, param=FUSED_EXPERTS),
    Rule("vllm-experts", "per_expert_on_3d", "error",
         "holds the experts of {family} as 3-D tensors and reads only fused (target_parameters) LoRA there: per-expert "
         "modules ({n}, e.g. {module}) are rejected as unexpected modules", MERGE,
         f"{_MOE} _create_lora_modules, lora_model.py check_unexpected_modules", since=MOE_READ, param=FUSED_EXPERTS),
    Rule("vllm-embedding", "embedding", "warning",
         "applies LoRA to {modules} only for models whose vLLM implementation lists them as embedding modules",
         "check the model's LoRA support in vLLM; or " + MERGE,
         "vllm/lora/utils.py get_supported_lora_modules, lora_model.py check_unexpected_modules"),
)

OPTIONS = (
    *(Option("--max-lora-rank", "rank", "the LoRA slot size, one of the values it accepts", source, since, until, limit)
      for limit, source, since, until in RANK_LIMITS),
    Option("--lora-target-modules", "modules", "optional: restricts LoRA to these module names; if given, it must list them",
           "vllm/engine/arg_utils.py, lora/utils.py is_in_target_modules", since="0.19.0"),
)

VLLM = Runtime("vllm", "vLLM", (OLDEST, NEWEST), RULES, OPTIONS,
               read=("0.10.0", "0.11.0", "0.11.1", "0.11.2", "0.12.0", "0.15.0", "0.17.0", "0.18.0", "0.18.1", "0.19.0",
                     "0.20.0", "0.25.0", "0.28.0", "0.30.0", "0.31.0", "0.32.0", "0.33.0"))
