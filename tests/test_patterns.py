"""rank_pattern / alpha_pattern / rsLoRA resolution agrees with PEFT's."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key

import loratools
from loratools.config import AdapterConfig, pattern_value
from tests.peft_ref import peft_model

Q0 = "model.layers.0.self_attn.q_proj"
Q1 = "model.layers.1.self_attn.q_proj"
Q10 = "model.layers.10.self_attn.q_proj"
DOWN1 = "model.layers.1.mlp.down_proj"

TRICKY = [
    ({"q_proj": 8}, Q0),  # plain suffix
    ({"proj": 8}, Q0),  # part of a leaf name is not a dotted suffix
    ({"self_attn.q_proj": 8}, Q0),  # multi-component suffix
    ({"layers.0.self_attn.q_proj": 8}, Q10),  # "layers.0" must not match layer 10
    ({"layers.1.self_attn.q_proj": 8}, Q10),  # ... nor layer 1 match layer 10
    ({"^model.layers.1.mlp.down_proj": 8}, DOWN1),  # ^ anchors to the full path: matches
    ({"^layers.1.mlp.down_proj": 8}, DOWN1),  # ^ anchors: a suffix is not enough
    ({"q_proj": 2, "layers.0.self_attn.q_proj": 6}, Q0),  # first match wins
    ({"layers.0.self_attn.q_proj": 6, "q_proj": 2}, Q0),  # ... in dict order
    ({"layers.0.self_attn.q_proj": 6, "q_proj": 2}, Q1),
    ({"q_proj|v_proj": 4}, Q1),  # alternation
    ({r"layers\.[01]\.self_attn\.q_proj": 4}, Q10),  # character class
    ({r"layers\.[01]\.self_attn\.q_proj": 4}, Q1),
    ({"model.*down_proj": 4}, DOWN1),  # wildcards across components
    ({"model.layers.0.self_attn.q_proj": 4}, Q0),  # the full path itself
    ({"base_model.model.model.layers.0.self_attn.q_proj": 4}, Q0),  # too long: no match
    ({"q_proj$": 4}, Q0),
    ({}, Q0),
]


def peft_value(patterns: dict, path: str, default: int) -> int:
    """Exactly how PEFT's LoraModel._create_and_replace resolves a value."""
    return patterns.get(get_pattern_key(patterns.keys(), path), default)


@pytest.mark.parametrize("patterns,path", TRICKY)
def test_tricky_patterns_agree_with_peft(patterns, path):
    assert pattern_value(patterns, path, 99) == peft_value(patterns, path, 99)


def test_the_table_exercises_both_outcomes():
    hits = [pattern_value(p, path, 99) != 99 for p, path in TRICKY]
    assert any(hits) and not all(hits)


PIECES = ["model", "layers", "0", "1", "10", "self_attn", "q_proj", "mlp", "down_proj", ".", ".*", "^", r"\.", "|", "[01]"]


@settings(max_examples=300, deadline=None)
@given(
    keys=st.lists(st.lists(st.sampled_from(PIECES), min_size=1, max_size=5).map("".join), max_size=4, unique=True),
    path=st.sampled_from([Q0, Q1, Q10, DOWN1, "lm_head", "model.embed_tokens"]),
)
def test_random_patterns_agree_with_peft(keys, path):
    import re

    patterns = {}
    for i, key in enumerate(keys):
        try:
            re.compile(key)
        except re.error:
            continue
        patterns[key] = i + 1
    assert pattern_value(patterns, path, 99) == peft_value(patterns, path, 99)


def test_rank_and_alpha_resolve_independently():
    cfg = AdapterConfig.from_dict(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"layers.1.*": 3}}
    )
    assert (cfg.rank_for(Q0), cfg.alpha_for(Q0)) == (2, 8)
    assert (cfg.rank_for(Q1), cfg.alpha_for(Q1)) == (2, 3)
    assert (cfg.rank_for(DOWN1), cfg.alpha_for(DOWN1)) == (4, 3)


@pytest.mark.parametrize("name", ["llama-rslora-patterns", "llama-basic", "gpt2-conv1d", "bert-modules-to-save", "llama-embedding"])
def test_per_module_rank_alpha_scaling_match_peft_layers(name):
    from tests.conftest import ADAPTER_BASE, ADAPTERS

    ours = loratools.load_adapter(ADAPTERS / name)
    model = peft_model(ADAPTER_BASE[name], ADAPTERS / name)
    seen = 0
    for module_name, module in model.base_model.model.named_modules():
        if hasattr(module, "scaling") and "default" in getattr(module, "r", {}):
            mine = ours.modules[module_name]
            assert mine.rank == module.r["default"], module_name
            assert mine.alpha == module.lora_alpha["default"], module_name
            assert mine.scaling == pytest.approx(module.scaling["default"], rel=1e-12), module_name
            seen += 1
    assert seen == len(ours.modules) > 0


@settings(max_examples=300, deadline=None)
@given(
    keys=st.lists(st.text(alphabet="qv_proj.0123^$\\|()*+?lay", min_size=1, max_size=10), min_size=1, max_size=6),
    path=st.sampled_from([Q0, Q1, Q10, DOWN1, "model.layers.1.self_attn.v_proj", "lm_head"]),
)
def test_prefiltered_lookup_equals_the_plain_regex_loop(keys, path):
    """The literal-tail pre-filter never changes which key wins: same answer as matching every
    key in order with Python's re, as PEFT does."""
    import re

    patterns = {}
    for i, key in enumerate(keys):
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error:
            continue
        patterns[key] = i
    expected = next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", path)), patterns.get(path, -1))
    assert pattern_value(patterns, path, -1) == expected
