"""loratools' MoE experts table (arch/experts.py) held against transformers' own conversion
mapping, for every model type whose checkpoints store experts one by one (a WeightConverter with
MergeModulelist): each on-disk expert tensor of the table, renamed and converted by transformers'
own rename_source_key, lands in the table's fused parameter, in the table's part order, along
the table's concatenation dim."""

from __future__ import annotations

import pytest

from loratools.arch import experts as moe

transformers = pytest.importorskip("transformers")
from transformers.conversion_mapping import _build_checkpoint_conversion_mapping  # noqa: E402
from transformers.core_model_loading import (  # noqa: E402
    Concatenate, MergeModulelist, WeightConverter, WeightRenaming, rename_source_key,
)

MAPPING = _build_checkpoint_conversion_mapping()
LAYER = "model.layers.7."


def expert_converters(model_type: str) -> list[WeightConverter]:
    return [c for c in MAPPING[model_type]
            if isinstance(c, WeightConverter) and any(isinstance(op, MergeModulelist) for op in c.operations)]


MERGING = sorted(t for t in MAPPING if expert_converters(t))


def test_every_model_type_transformers_merges_experts_for_is_in_the_table():
    assert len(MERGING) > 40  # the mapping is what we think it is
    assert sorted(set(MERGING) - set(moe.BY_MODEL_TYPE)) == []


@pytest.mark.parametrize("model_type", MERGING)
def test_table_matches_transformers(model_type):
    layout = moe.BY_MODEL_TYPE[model_type]
    renamings = [c for c in MAPPING[model_type] if isinstance(c, WeightRenaming)]
    converters = [c for c in MAPPING[model_type] if isinstance(c, WeightConverter)]
    used = set()
    for fused in layout.parameters:
        parameter = f"{LAYER}{layout.module}.{fused.name}"
        places = moe.placements(layout, parameter, num_experts=3, d1=6 * len(fused.parts))
        assert places is not None and len(places) == 3 * len(fused.parts)
        for place in places:
            disk = place.names[0]
            loaded, pattern = rename_source_key(disk, renamings, converters)
            # (a model type's renamings may also move the layer itself, e.g. under language_model)
            assert loaded.endswith(f"layers.7.{layout.module}.{fused.name}"), (disk, loaded)
            converter = next(c for c in converters if pattern in c.source_patterns)
            used.add(id(converter))
            k = (place.rows[0] // 6)
            assert converter.source_patterns.index(pattern) == k, (disk, converter.source_patterns)
            concat = [op.dim for op in converter.operations if isinstance(op, Concatenate)]
            assert concat == ([1] if len(fused.parts) > 1 else []), converter.operations
            assert disk.startswith(LAYER) and f".{place.expert}." in disk
    # every expert-merging converter of the model type is one of the table's parameters
    assert {id(c) for c in expert_converters(model_type)} <= used


def test_gpt_oss_is_stored_as_in_memory():
    """gpt_oss checkpoints hold the fused parameters themselves: no converter merges its experts,
    and its experts are (E, in, out) (transformers' is_transposed, checked on the module below)."""
    assert "gpt_oss" not in MERGING
    assert moe.BY_MODEL_TYPE["gpt_oss"].transposed and all(not p.parts for p in moe.BY_MODEL_TYPE["gpt_oss"].parameters)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss"])
def test_registration_order_and_orientation(model_type):
    """PEFT nests its wrappers in the experts module's registration order, and takes in/out from the
    module's is_transposed: the table's order and `transposed` are the modules' own."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dims = dict(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                head_dim=8, intermediate_size=12, moe_intermediate_size=12, num_experts=2, num_local_experts=2,
                n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=0, q_lora_rank=8, kv_lora_rank=8,
                qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **dims))
    layout = moe.BY_MODEL_TYPE[model_type]
    experts = model.get_submodule(f"model.layers.0.{layout.module}")
    names = [n for n, p in experts.named_parameters(recurse=False) if p.dim() == 3]
    assert names == [p.name for p in layout.parameters]
    assert bool(getattr(experts, "is_transposed", False)) == layout.transposed
