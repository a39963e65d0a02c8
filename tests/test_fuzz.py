"""Property-based: whatever the bytes, reading an adapter raises loratools' own clean errors only."""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loratools
from loratools.config import AdapterConfig
from loratools.errors import LoraToolsError
from loratools.formats.safetensors_header import parse_header
from tests.conftest import ADAPTERS

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(raw=st.binary(max_size=200), extra=st.integers(0, 1000))
def test_random_header_bytes(raw, extra):
    try:
        parse_header(raw, 8 + len(raw) + extra, name="x.safetensors")
    except LoraToolsError:
        pass


entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "F12", "", None]) | json_values,
        "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-5, 400), min_size=0, max_size=3) | json_values,
    },
)


@FUZZ
@given(header=st.dictionaries(st.text(max_size=10), entry | json_values, max_size=5), data_len=st.integers(0, 400))
def test_structured_headers(header, data_len):
    raw = json.dumps(header).encode()
    try:
        parsed = parse_header(raw, 8 + len(raw) + data_len, name="x.safetensors")
    except LoraToolsError:
        return
    # Whatever passes is internally consistent: tensors tile the data buffer exactly.
    assert sum(t.end - t.start for t in parsed.tensors.values()) == data_len


CONFIG_FIELDS = ["peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                 "fan_in_fan_out", "lora_bias", "bias", "target_modules", "modules_to_save", "auto_mapping"]


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(CONFIG_FIELDS), json_values, max_size=6))
def test_random_configs(fields):
    try:
        cfg = AdapterConfig.from_dict({"peft_type": "LORA", **fields})
        cfg.scaling_for("model.layers.0.self_attn.q_proj")
    except LoraToolsError:
        pass


@FUZZ
@given(data=st.data())
def test_mutated_adapter_files(tmp_path_factory, data):
    """Flip, cut or splice bytes of a real adapter file: opening it and reading every tensor
    either works or raises a LoraToolsError."""
    src = ADAPTERS / "llama-dora"
    raw = bytearray((src / "adapter_model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    how = data.draw(st.sampled_from(["flip-header", "flip-anywhere", "truncate", "append"]))
    if how == "flip-header":
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, 8 + n - 1))] = data.draw(st.integers(0, 255))
    elif how == "flip-anywhere":
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= 0xFF
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=16))
    work = tmp_path_factory.mktemp("fuzz")
    (work / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    (work / "adapter_model.safetensors").write_bytes(bytes(raw))
    try:
        adapter = loratools.load_adapter(work)
        for path in adapter.modules:
            adapter.delta(path)
    except LoraToolsError:
        pass
