"""loratools' key renames (arch/renames.py) against transformers' own conversion mapping, for every
model_type transformers knows — not only the families with fixtures.

transformers applies, when loading, the renames registered for the root model's class (else its
model_type), then those of its base model class scoped under `model.` (get_model_conversion_mapping);
this test builds the same lists from transformers' mapping and renames keys with transformers'
own functions, without building any model.
"""

from __future__ import annotations

import pytest
from transformers.conversion_mapping import _build_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming, apply_renamings
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from loratools.arch.renames import NOT_COVERED, RENAMES, alternatives, checkpoint_name, module_name

MAPPING = _build_checkpoint_conversion_mapping()
# A text decoder's weights in every layout loratools or transformers uses: the module tree
# (multimodal and CausalLM), the older multimodal layouts, Mixtral's sparse block.
MODULE_KEYS = ("model.language_model.layers.0.self_attn.q_proj.weight", "model.language_model.embed_tokens.weight",
               "lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight",
               "model.layers.0.mlp.gate.weight")
OLD_KEYS = ("language_model.model.layers.0.self_attn.q_proj.weight", "language_model.lm_head.weight",
            "language_model.model.embed_tokens.weight", "model.layers.0.block_sparse_moe.gate.weight")


def _renamings(name: str | None, scoped: bool = False) -> list[WeightRenaming]:
    out = [t for t in MAPPING.get(name) or [] if isinstance(t, WeightRenaming)]
    for t in out if scoped else ():  # a sub-model's transforms, as get_model_conversion_mapping scopes them
        t.scope_prefix, t.base_model_prefix = "", "model"
    return out


def transformers_load_name(model_type: str, key: str) -> str:
    """The name transformers loads checkpoint key `key` under, in model_type's main model."""
    root = (modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
            or modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type))
    base = modeling_auto.MODEL_MAPPING_NAMES.get(model_type)
    renamings = _renamings(root) if root in MAPPING else _renamings(model_type)
    if base in MAPPING and base != root:
        renamings += _renamings(base, scoped=True)
    return apply_renamings(key, renamings)


def _text_renamed(model_type: str) -> bool:
    return any(transformers_load_name(model_type, k) != k for k in MODULE_KEYS + OLD_KEYS)


MODEL_TYPES = sorted(t for t in CONFIG_MAPPING_NAMES if isinstance(t, str))


@pytest.mark.parametrize("model_type", sorted(RENAMES))
def test_table_renames_as_transformers_loads(model_type):
    checked = 0
    for key in MODULE_KEYS:
        stored = checkpoint_name(model_type, key)
        if stored == key:
            continue
        checked += 1
        # The older layout loads under the module tree's name, and the module tree's name loads as it is.
        assert transformers_load_name(model_type, stored) == key, (stored, key)
        assert module_name(model_type, stored) == key and module_name(model_type, key) == key
        assert stored in alternatives((model_type,), key) and key in alternatives((model_type,), stored)
    assert checked, f"{model_type}: no text key renamed; it does not belong in RENAMES"


def test_every_model_type_with_text_renames_is_in_the_table():
    """Any model_type transformers renames text weights for is in RENAMES or NOT_COVERED (with why)."""
    renamed = {t for t in MODEL_TYPES if _text_renamed(t)}
    missing = sorted(renamed - set(RENAMES) - set(NOT_COVERED))
    assert not missing, f"transformers renames text weights of {missing}: add them to loratools/arch/renames.py"
    stale = sorted((set(RENAMES) | set(NOT_COVERED)) - renamed)
    assert not stale, f"transformers no longer renames text weights of {stale}"
    assert not set(RENAMES) & set(NOT_COVERED)


def test_the_multimodal_families_are_checked():
    """The premise: the families with fixtures are among what transformers renames."""
    for model_type in ("gemma3", "mistral3", "llava", "qwen2_5_vl", "mixtral"):
        assert _text_renamed(model_type), model_type
