"""Property-based: whatever the bytes, reading an adapter raises loratools' own clean errors only."""

from __future__ import annotations

import json
import math
import shutil
import struct

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import loratools
from loratools.config import AdapterConfig
from loratools.errors import LoraToolsError
from loratools.formats.safetensors_header import parse_header
from tests.conftest import ADAPTER_BASE, ADAPTERS, BASES, FUZZ_PROFILE

# The class defaults of LoraToolsError and its subclasses: a refusal a user (and validate) can
# act on carries a code naming the problem instead.
GENERIC_CODES = {"error", "usage", "not-found", "format", "config", "shape", "unsupported"}


def fuzz(ci_examples: int) -> settings:
    """A test's settings under the profile tests/conftest.py loaded: the CI profile runs
    `ci_examples` derandomized examples (the same ones on every run), the random profile its
    own count (LORATOOLS_FUZZ_EXAMPLES)."""
    count = {"max_examples": ci_examples} if FUZZ_PROFILE == "ci" else {}
    return settings(**count, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def assert_reported(exc: LoraToolsError, prefix: str | None = "") -> None:
    """A refusal as the CLI prints it and validate reports it: one non-empty line, and a
    specific code of the family `prefix` (None: any code, a class default too)."""
    message = str(exc)
    assert message.strip() and "\n" not in message, repr(message)
    assert exc.code and (prefix is None or (exc.code not in GENERIC_CODES and exc.code.startswith(prefix))), (exc.code, message)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@fuzz(200)
@given(raw=st.binary(max_size=200), extra=st.integers(0, 1000))
def test_random_header_bytes(raw, extra):
    try:
        parse_header(raw, 8 + len(raw) + extra, name="x.safetensors")
    except LoraToolsError as exc:
        assert_reported(exc, "st-")


entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "F12", "", None]) | json_values,
        "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-5, 400), min_size=0, max_size=3) | json_values,
    },
)


@fuzz(200)
@given(header=st.dictionaries(st.text(max_size=10), entry | json_values, max_size=5), data_len=st.integers(0, 400))
def test_structured_headers(header, data_len):
    raw = json.dumps(header).encode()
    try:
        parsed = parse_header(raw, 8 + len(raw) + data_len, name="x.safetensors")
    except LoraToolsError as exc:
        assert_reported(exc, "st-")
        return
    # Whatever passes is internally consistent: tensors tile the data buffer exactly.
    assert sum(t.end - t.start for t in parsed.tensors.values()) == data_len


CONFIG_FIELDS = ["peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                 "fan_in_fan_out", "lora_bias", "bias", "target_modules", "modules_to_save", "auto_mapping"]


@fuzz(200)
@given(fields=st.dictionaries(st.sampled_from(CONFIG_FIELDS), json_values, max_size=6))
def test_random_configs(fields):
    try:
        cfg = AdapterConfig.from_dict({"peft_type": "LORA", **fields})
        scaling = cfg.scaling_for("model.layers.0.self_attn.q_proj")
    except LoraToolsError as exc:
        assert_reported(exc, "config-")
        return
    assert math.isfinite(scaling), (fields, scaling)  # a config that loads has a finite scaling


@fuzz(200)
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
    except LoraToolsError as exc:
        assert_reported(exc)


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


SOURCE = ADAPTERS / "llama-basic"
SOURCE_KEYS = sorted(loratools.load_adapter(SOURCE).tensors.keys())  # from the header
Q_A, Q_B = f"{A_KEY}.lora_A.weight", f"{A_KEY}.lora_B.weight"
KINDS = ["randn"] * 4 + ["nan", "inf", "zeros", "int", "huge", "half"]
values = st.tuples(st.sampled_from(KINDS), st.integers(0, 99))  # (kind, seed): see _tensor
MUTATIONS = {
    "config": st.sampled_from(sorted(VARIANT_FIELDS) + CONFIG_FIELDS).flatmap(
        lambda field: st.tuples(st.just("config"), st.just(field), VARIANT_FIELDS.get(field, json_values))),
    "add": st.tuples(st.just("add"), st.builds("{}.{}".format, st.sampled_from(MODULES), st.sampled_from(PART_SUFFIXES)),
                     st.lists(st.integers(0, 70), min_size=1, max_size=2).map(tuple), values),
    "drop": st.tuples(st.just("drop"), st.sampled_from(SOURCE_KEYS)),
    "value": st.tuples(st.just("value"), st.sampled_from(SOURCE_KEYS), values),
    "shape": st.tuples(st.just("shape"), st.sampled_from(SOURCE_KEYS), st.lists(st.integers(0, 20), min_size=1, max_size=3).map(tuple),
                       values),
    # a trained tensor times a factor up to and past where float16, bfloat16 and float32 overflow
    "scale": st.tuples(st.just("scale"), st.sampled_from(SOURCE_KEYS),
                       st.sampled_from([1e2, 1e3, 1e4, 3e4, 1e5, 1e15, 1e19, 1e20, 1e30, -1e35, 1e38])),
}
# One to three mutations of config, tensor names, shapes, dtypes and values, as plain tuples (so
# that what a run finds can be pinned below as hypothesis prints it).
mutation_lists = st.lists(st.sampled_from(["config", "config", "add", "drop", "value", "value", "shape", "scale", "scale"])
                          .flatmap(MUTATIONS.__getitem__), min_size=1, max_size=3)


def _tensor(shape, kind: str, seed: int):
    import torch

    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
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


def _mutated(mutations) -> tuple[dict, dict]:
    """The llama-basic fixture's config and tensors after the mutations."""
    from safetensors.torch import load_file

    config = json.loads((SOURCE / "adapter_config.json").read_text())
    tensors = load_file(str(SOURCE / "adapter_model.safetensors"))
    for how, key, *rest in mutations:
        if how == "config":
            config[key] = rest[0]
        elif how == "add" or how == "shape":
            tensors[key] = _tensor(rest[0], *rest[1])
        elif how == "drop":
            tensors.pop(key, None)
        elif how == "scale" and key in tensors and tensors[key].is_floating_point():
            tensors[key] = tensors[key] * rest[0]
        elif how == "value" and key in tensors:  # same shape, other values
            tensors[key] = _tensor(tuple(tensors[key].shape), *rest[0])
    return config, tensors


@pytest.fixture(scope="session")
def cast_base(tmp_path_factory):
    """(family, dtype code) -> the tiny fixture base of that family with its tensors cast to the
    dtype ("F32": as stored). Float16 matters most: 65504 is easy to exceed."""
    import torch
    from safetensors.torch import load_file, save_file

    made = {}

    def cast(family: str, code: str):
        if code == "F32":
            return BASES / family
        if (family, code) not in made:
            path = tmp_path_factory.mktemp(f"{family}-{code}") / "base"
            shutil.copytree(BASES / family, path, ignore=shutil.ignore_patterns("*.safetensors"))
            dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}[code]
            weights = load_file(str(BASES / family / "model.safetensors"))
            save_file({k: v.to(dtype) for k, v in weights.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
            made[family, code] = path
        return made[family, code]

    return cast


def _validate_and_merge(work, base, config: dict, tensors: dict):
    """(validate's result against base, merge's refusal or None) for this adapter, merged into work/out."""
    import torch
    from safetensors.torch import load_file, save_file

    from loratools.formats.checkpoint import open_checkpoint
    from loratools.ops.validate import validate_guarded

    adapter = work / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(adapter / "adapter_model.safetensors"))
    result = validate_guarded(adapter, open_checkpoint(base))
    assert all(f.code not in ("internal-error", "error") for f in result.findings), result.findings
    try:
        loratools.merge(base, adapter, work / "out", device="cpu")
    except LoraToolsError as exc:
        assert_reported(exc, None)
        return result, exc
    out = load_file(str(work / "out" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in out.values() if t.is_floating_point())
    return result, None


DOWN, GATE = "base_model.model.model.layers.0.mlp.down_proj", "base_model.model.model.layers.0.mlp.gate_proj"


# Pinned: the case, then what the random profile (LORATOOLS_FUZZ=random) found; each once
# failed (validate passed, merge refused the non-finite result).
@fuzz(500)
@example(base="F32", mutations=[("value", Q_A, ("huge", 1)), ("value", Q_B, ("huge", 2))])  # ΔW ~ 1e60: float32 overflows
@example(base="F16", mutations=[("scale", f"{DOWN}.lora_A.weight", 1e15)])  # ΔW ~ 1e15: finite in float32, not float16
@example(base="F32", mutations=[("value", f"{DOWN}.lora_A.weight", ("randn", 0)), ("scale", f"{DOWN}.lora_B.weight", 1e38)])
@example(base="F32", mutations=[("scale", f"{GATE}.lora_A.weight", 1e4), ("scale", f"{GATE}.lora_A.weight", -1e35)])
@given(base=st.sampled_from(["F32", "BF16", "F16"]), mutations=mutation_lists)
def test_validate_passes_only_what_merge_merges(tmp_path_factory, cast_base, base, mutations):
    """Whatever the mutations, validate never fails unexpectedly, merge raises only loratools' own
    errors, an adapter validate passes (against the same base) merges into finite tensors, and
    where validate says merge would overflow, merge refuses in those very words."""
    config, tensors = _mutated(mutations)
    result, refusal = _validate_and_merge(tmp_path_factory.mktemp("agree"), cast_base("llama", base), config, tensors)
    event(f"{base}: validate {'ok' if result.ok() else 'fails'}, merge {'refused' if refusal else 'done'}")
    assert refusal is None or not result.ok(), (str(refusal), result.findings)
    for finding in (f for f in result.findings if f.code == "merge-overflow"):
        event(f"{base}: merge-overflow")
        assert refusal is not None and (refusal.code, str(refusal)) == (finding.code, finding.message)


# ---- merged values that overflow: the classes, pinned ----------------------------------------------


def _scaled(fixture: str, factors: dict[str, float]) -> tuple[dict, dict]:
    """A fixture adapter's config and tensors, every tensor whose key ends with a key of
    `factors` multiplied by its factor."""
    config = json.loads((ADAPTERS / fixture / "adapter_config.json").read_text())
    tensors = loratools.load_adapter(ADAPTERS / fixture).state_dict()
    for key in tensors:
        for suffix, factor in factors.items():
            if key.endswith(suffix):
                tensors[key] = tensors[key] * factor
    return config, tensors


BOTH_HUGE = {"lora_A.weight": 1e30, "lora_B.weight": 1e30}  # the issue: ΔW ~ 1e60


@pytest.mark.parametrize("fixture, family, dtype, factors", [
    ("llama-basic", "llama", "F32", BOTH_HUGE),
    ("llama-basic", "llama", "BF16", BOTH_HUGE),
    ("llama-basic", "llama", "F16", BOTH_HUGE),
    ("llama-basic", "llama", "F16", {"lora_B.weight": 1e30}),  # finite in float32, not in float16
    ("llama-dora", "llama", "F16", {"lora_magnitude_vector": 1e30}),  # DoRA's rows are scaled to |m|
    ("gpt2-lora-bias", "gpt2", "F16", {"lora_B.bias": 1e5}),  # b + s·bias
    ("bert-modules-to-save", "bert", "F16", {"base_layer.bias": 1e30}),  # a saved bias, cast to float16
    ("llama-embedding", "llama", "F16", {"base_layer.weight": 1e6}),  # a saved embedding, then + ΔW
])
def test_overflowing_merges_are_refused_by_validate_and_merge_alike(tmp_path, cast_base, fixture, family, dtype, factors):
    result, refusal = _validate_and_merge(tmp_path, cast_base(family, dtype), *_scaled(fixture, factors))
    assert [f.code for f in result.findings if f.severity == "error"] == ["merge-overflow"], result.findings
    assert refusal is not None and (refusal.code, str(refusal)) == ("merge-overflow", result.findings[-1].message)
    assert "is not finite" in str(refusal) and {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[dtype] in str(refusal)


@pytest.mark.parametrize("fixture, family, dtype, factors", [
    ("llama-basic", "llama", "F32", {"lora_B.weight": 1e30}),  # |ΔW| ~ 1e30: far from float32's 3.4e38
    ("llama-basic", "llama", "BF16", {"lora_B.weight": 1e30}),
    ("llama-basic", "llama", "F16", {"lora_B.weight": 2e4}),  # |ΔW| bound past 65504, the values not
    ("gpt2-lora-bias", "gpt2", "F32", {"lora_B.bias": 1e38}),
    ("llama-dora", "llama", "F16", {}),
    ("llama-basic", "llama", "F64", BOTH_HUGE),  # ΔW ~ 1e60: beyond float32, finite in the float64 merge
    ("llama-dora", "llama", "F64", BOTH_HUGE),
])
def test_large_but_finite_merges_pass_both(tmp_path, cast_base, fixture, family, dtype, factors):
    result, refusal = _validate_and_merge(tmp_path, cast_base(family, dtype), *_scaled(fixture, factors))
    assert refusal is None and result.ok(), (str(refusal), result.findings)


def test_dora_row_of_norm_zero_is_refused_by_validate_and_merge_alike(tmp_path):
    """W_0 = 0 and B_0 = 0: ‖W_0 + ΔW_0‖ = 0 and DoRA's m/‖·‖ is not finite. Only the base's
    values show it: validate reads them for DoRA modules."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(BASES / "llama", base)
    weights = load_file(str(base / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"][0] = 0
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    config, tensors = _scaled("llama-dora", {})
    tensors[f"{A_KEY}.lora_B.weight"][0] = 0
    result, refusal = _validate_and_merge(tmp_path / "work", base, config, tensors)
    assert refusal is not None and refusal.code == "merge-overflow" and "norm of 0" in str(refusal)
    assert [(f.code, f.message) for f in result.findings] == [(refusal.code, str(refusal))]


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_real_adapters_settle_without_merging_in_the_plan(tmp_path, cast_base, monkeypatch, dtype):
    """The fixtures (PEFT-trained, factors ~1e-1): the bound from the factors settles every
    module; the base is read only under DoRA (its row norms), nothing is merged in the plan."""
    from loratools.ops.merge import bounds as merge_bounds

    def refuse(*args):
        raise AssertionError(f"computed in the plan: {args[1]}")

    monkeypatch.setattr(merge_bounds, "_merge_exactly", refuse)
    held_values = merge_bounds._held_values
    for fixture, family in ADAPTER_BASE.items():
        dora = json.loads((ADAPTERS / fixture / "adapter_config.json").read_text()).get("use_dora")
        monkeypatch.setattr(merge_bounds, "_held_values", held_values if dora else refuse)
        result, refusal = _validate_and_merge(tmp_path / fixture / dtype, cast_base(family, dtype), *_scaled(fixture, {}))
        assert refusal is None and result.ok(), (fixture, str(refusal), result.findings)
