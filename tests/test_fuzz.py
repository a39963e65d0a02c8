"""Property-based: whatever the bytes, reading an adapter raises loratools' own clean errors only."""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, event, given, settings
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


# ---- validate and merge agree -----------------------------------------------------------------

A_KEY = "base_model.model.model.layers.0.self_attn.q_proj"
PART_SUFFIXES = ["lora_diag", "lora_magnitude_vector", "lora_B.bias", "base_layer.weight", "base_layer.bias", "lora_velora_embed",
                 "lora_embedding_A", "lora_C.weight", "token_adapter.trainable_tokens_delta", "weight", "lora_A.default.weight"]
MODULES = [A_KEY, "base_model.model.model.embed_tokens", "base_model.model.lm_head", "base_model.model.model.layers.1.mlp.up_proj",
           "base_model.model.model.norm", "model.layers.0.self_attn.q_proj"]
VARIANT_FIELDS = {
    "kasa_config": st.just({"beta": 0.0001}), "velora_config": st.just({"scale": 1.0}), "use_bdlora": st.just({"nblocks": 2}),
    "alora_invocation_tokens": st.lists(st.integers(0, 9), max_size=2), "layer_replication": st.just([[0, 1]]),
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "olora", "mica", "loftq", "eva"]),
    "trainable_token_indices": st.sampled_from([[1, 2], {"embed_tokens": [3]}, [70], [1, 1], "x"]),
    "target_modules": st.sampled_from([None, [], "", ".*q_proj", "(", ["q_proj"]]),
    "lora_alpha": st.sampled_from([8, 16, 0, -4, 1e308, 1e20, float("nan")]),
    "use_rslora": st.booleans(), "use_dora": st.booleans(), "lora_bias": st.booleans(), "fan_in_fan_out": st.booleans(),
    "bias": st.sampled_from(["none", "all", "lora_only", "x"]),
    "rank_pattern": st.sampled_from([{}, {"q_proj": 2}, {"(?i)q": 4}, {"(.*)*x": 4}, {"^model": 4}]),
}


def _tensor(draw, shape):
    import torch

    kind = draw(st.sampled_from(["randn"] * 4 + ["nan", "inf", "zeros", "int", "huge", "half"]))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    if kind == "nan" and t.numel():
        t.view(-1)[0] = float("nan")
    elif kind == "inf" and t.numel():
        t.view(-1)[-1] = float("inf")
    elif kind == "zeros":
        t.zero_()
    elif kind == "int":
        t = t.to(torch.int8)
    elif kind == "huge":
        t = t * 1e30
    elif kind == "half":
        t = t.to(torch.float16)
    return t


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_validate_passes_only_what_merge_merges(tmp_path_factory, data):
    """One to three mutations of config, tensor names, shapes, dtypes and values: validate never
    fails unexpectedly, merge raises only loratools' own errors, and an adapter validate passes
    (against the same base) merges."""
    import torch
    from safetensors.torch import load_file, save_file

    from loratools.formats.checkpoint import open_checkpoint
    from loratools.ops.validate import validate_guarded
    from tests.conftest import BASES

    src = ADAPTERS / "llama-basic"
    config = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    for _ in range(data.draw(st.integers(1, 3))):
        how = data.draw(st.sampled_from(["config", "config", "add", "drop", "value", "value", "shape"]))
        if how == "config":
            field = data.draw(st.sampled_from(sorted(VARIANT_FIELDS) + CONFIG_FIELDS))
            config[field] = data.draw(VARIANT_FIELDS.get(field, json_values))
        elif how == "add":
            key = f"{data.draw(st.sampled_from(MODULES))}.{data.draw(st.sampled_from(PART_SUFFIXES))}"
            shape = data.draw(st.lists(st.integers(0, 70), min_size=1, max_size=2))
            tensors[key] = _tensor(data.draw, shape)
        elif how == "drop" and tensors:
            tensors.pop(data.draw(st.sampled_from(sorted(tensors))))
        elif how == "value" and tensors:
            key = data.draw(st.sampled_from(sorted(tensors)))
            tensors[key] = _tensor(data.draw, tuple(tensors[key].shape))
        elif how == "shape" and tensors:
            key = data.draw(st.sampled_from(sorted(tensors)))
            tensors[key] = _tensor(data.draw, data.draw(st.lists(st.integers(0, 20), min_size=1, max_size=3)))
    work = tmp_path_factory.mktemp("agree")
    adapter = work / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(adapter / "adapter_model.safetensors"))

    base = BASES / "llama"
    result = validate_guarded(adapter, open_checkpoint(base))
    assert all(f.code not in ("internal-error", "error") for f in result.findings), result.findings
    try:
        loratools.merge(base, adapter, work / "out", device="cpu")
        merged = True
    except LoraToolsError:
        merged = False
    event(f"validate {'ok' if result.ok() else 'fails'}, merge {'done' if merged else 'refused'}")
    assert merged or not result.ok(), result.findings
    if merged:
        out = load_file(str(work / "out" / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in out.values())
