"""plan_merge as a pure function: a checkpoint described by headers held in memory and an adapter
held in memory, no file opened. The plan is the record of every output tensor: what makes it
(copy, cast, dequantize, merge, replace, requantize), with which kernel, from which adapter
tensors; the executor only carries it out."""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch

from loratools import Adapter
from loratools.errors import LoraToolsError
from loratools.formats.checkpoint import Checkpoint
from loratools.formats.dtypes import DTYPES
from loratools.formats.safetensors_header import parse_header
from loratools.ops.merge import TensorOps
from loratools.ops.merge import plan_merge as library_plan_merge
from loratools.ops.merge.plan import kernel_for

HIDDEN, VOCAB = 8, 16
PREFIX = "base_model.model."


def header(tensors: dict[str, tuple[str, tuple[int, ...]]], name: str):
    """A safetensors header for `tensors` (name -> (dtype code, shape)), parsed as read_header would."""
    entries, offset = {}, 0
    for key, (dtype, shape) in tensors.items():
        size = DTYPES[dtype].size
        for d in shape:
            size *= d
        entries[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries).encode()
    return parse_header(raw, 8 + len(raw) + offset, name=name, path=f"/nowhere/{name}")


def llama(dtype: str = "BF16", tied: bool = False) -> Checkpoint:
    """A two-layer LLaMA, one shard per layer (the embedding and head with the first and last)."""
    layer = {f"self_attn.{p}_proj.weight": (dtype, (HIDDEN, HIDDEN)) for p in "qkvo"}
    layer["input_layernorm.weight"] = (dtype, (HIDDEN,))
    first = {"model.embed_tokens.weight": (dtype, (VOCAB, HIDDEN))} | {f"model.layers.0.{k}": v for k, v in layer.items()}
    second = {f"model.layers.1.{k}": v for k, v in layer.items()} | {"model.norm.weight": (dtype, (HIDDEN,))}
    second["model.layers.1.step"] = ("I64", (1,))  # not a float: --dtype leaves it alone
    if not tied:
        second["lm_head.weight"] = (dtype, (VOCAB, HIDDEN))
    shards = {"model-1.safetensors": header(first, "model-1.safetensors"),
              "model-2.safetensors": header(second, "model-2.safetensors")}
    weight_map = {key: shard for shard, h in shards.items() for key in h.tensors}
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": tied,
              "hidden_size": HIDDEN, "vocab_size": VOCAB}
    return Checkpoint(Path("/nowhere"), False, shards, weight_map, index={"weight_map": weight_map}, config=config)


def adapter(modules=("q_proj",), r: int = 2, **config) -> Adapter:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in (0, 1):
        for m in modules:
            path = f"{PREFIX}model.layers.{layer}.self_attn.{m}"
            tensors[f"{path}.lora_A.weight"] = torch.randn(r, HIDDEN, generator=gen)
            tensors[f"{path}.lora_B.weight"] = torch.randn(HIDDEN, r, generator=gen)
            if config.get("use_dora"):
                tensors[f"{path}.lora_magnitude_vector"] = torch.rand(HIDDEN, generator=gen) + 0.5
    tensors |= config.pop("extra_tensors", {})
    raw = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(modules),
           "base_model_name_or_path": "tiny-llama", "task_type": "CAUSAL_LM"} | config
    return Adapter.from_tensors(raw, tensors, source="memory")


def plan_merge(*args, **kwargs):
    """The library's plan_merge, with every way of touching a file refused while it runs:
    planning reads headers and the adapter's values, both already in memory here."""
    def refuse(*a, **k):
        raise AssertionError(f"plan_merge touched a file: {a[:1]}")

    with mock.patch.object(builtins, "open", refuse), mock.patch.object(os, "open", refuse), \
            mock.patch.object(os, "stat", refuse):
        return library_plan_merge(*args, **kwargs)


def outputs(plan) -> dict[str, object]:
    return {out.name: out for outs in plan.outputs.values() for out in outs}


def test_plain_lora_is_merged_by_numpy_and_the_rest_copied():
    plan = plan_merge(llama(), adapter(("q_proj", "v_proj")))
    out = outputs(plan)
    q = out["model.layers.0.self_attn.q_proj.weight"]
    assert (q.action, q.kernel, q.held, q.dtype) == ("merge", "numpy", "BF16", "BF16")
    assert q.feeds == (f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight",
                       f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight")
    changed = {name for name, o in out.items() if o.action != "copy"}
    assert changed == {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in (0, 1) for m in "qv"}
    assert all(o.kernel is None and not o.feeds for o in out.values() if o.action == "copy")
    # every base tensor once, in its shard, in file order
    assert [o.name for o in plan.outputs["model-1.safetensors"]] == list(plan.base.shards["model-1.safetensors"].tensors)
    assert sum(map(len, plan.outputs.values())) == len(plan.base.weight_map)


def test_dtype_casts_the_float_tensors_and_keeps_the_others():
    # (widening: a narrower --dtype makes the plan read the base to bound the merged values)
    out = outputs(plan_merge(llama("BF16"), adapter(), dtype="float32"))
    assert (out["model.norm.weight"].action, out["model.norm.weight"].kernel, out["model.norm.weight"].dtype) == ("cast", "torch", "F32")
    assert (out["model.layers.1.step"].action, out["model.layers.1.step"].dtype) == ("copy", "I64")
    q = out["model.layers.1.self_attn.q_proj.weight"]
    assert (q.action, q.kernel, q.held, q.dtype) == ("merge", "numpy", "BF16", "F32")


def test_dora_is_computed_by_torch():
    # (not through plan_merge: DoRA's finiteness proof reads the base's row norms)
    path = "model.layers.0.self_attn.q_proj"
    dora, plain = adapter(use_dora=True).modules[path], adapter().modules[path]
    assert kernel_for(TensorOps(modules=[dora]), "BF16", "BF16", (HIDDEN, HIDDEN), "cpu") == "torch"
    assert kernel_for(TensorOps(modules=[plain]), "BF16", "BF16", (HIDDEN, HIDDEN), "cpu") == "numpy"
    assert kernel_for(TensorOps(modules=[plain]), "F64", "F64", (HIDDEN, HIDDEN), "cpu") == "torch"


def test_a_gpu_plan_computes_every_changed_tensor_with_torch_and_still_copies_the_rest():
    plan = plan_merge(llama(), adapter())
    gpu = plan.on_device("cuda:0")
    assert gpu.device == "cuda:0" and plan.device == "cpu"
    for cpu_out, gpu_out in zip(outputs(plan).values(), outputs(gpu).values()):
        assert gpu_out.action == cpu_out.action
        assert gpu_out.kernel == (None if cpu_out.kernel is None else "torch")


def test_a_saved_module_replaces_its_base_tensor():
    saved = {f"{PREFIX}model.embed_tokens.weight": torch.ones(VOCAB, HIDDEN)}  # as PEFT saves modules_to_save
    plan = plan_merge(llama(), adapter(modules_to_save=["embed_tokens"], extra_tensors=saved))
    embed = outputs(plan)["model.embed_tokens.weight"]
    assert (embed.action, embed.kernel, embed.feeds) == ("replace", "torch", tuple(saved))


def test_a_lora_on_a_tied_head_unties_it_into_a_tensor_of_its_own():
    gen = torch.Generator().manual_seed(1)
    head = {f"{PREFIX}lm_head.lora_A.weight": torch.randn(2, HIDDEN, generator=gen),
            f"{PREFIX}lm_head.lora_B.weight": torch.randn(VOCAB, 2, generator=gen)}
    plan = plan_merge(llama(tied=True), adapter(target_modules=["q_proj", "lm_head"], extra_tensors=head))
    first = plan.outputs["model-1.safetensors"]
    names = [o.name for o in first]
    assert names[:2] == ["model.embed_tokens.weight", "lm_head.weight"]  # written beside the embedding
    embed, lm_head = first[0], first[1]
    assert (embed.action, lm_head.action, lm_head.source, lm_head.shape) == ("copy", "merge", "model.embed_tokens.weight", (VOCAB, HIDDEN))
    assert plan.untied == {"lm_head.weight": "model.embed_tokens.weight"}


def test_the_plan_as_data_lists_every_output_tensor():
    data = plan_merge(llama(), adapter()).to_dict()
    json.dumps(data)  # plain data
    assert data["device"] == "cpu" and data["dtype"] is None
    tensors = [t for shard in data["shards"].values() for t in shard]
    assert {t["action"] for t in tensors} == {"copy", "merge"}
    assert all(set(t) == {"name", "dtype", "shape", "source", "action", "kernel", "held", "quantized", "feeds"} for t in tensors)


def test_a_shape_the_base_does_not_have_is_refused_while_planning():
    gen = torch.Generator().manual_seed(2)
    wrong = {f"{PREFIX}model.layers.0.self_attn.k_proj.lora_A.weight": torch.randn(2, HIDDEN + 1, generator=gen),
             f"{PREFIX}model.layers.0.self_attn.k_proj.lora_B.weight": torch.randn(HIDDEN, 2, generator=gen)}
    with pytest.raises(LoraToolsError, match="k_proj"):
        plan_merge(llama(), adapter(target_modules=["q_proj", "k_proj"], extra_tensors=wrong))


# ---- the command ---------------------------------------------------------------------------------


def test_merge_dry_run_prints_the_plan_that_merge_then_writes(tmp_path):
    """`merge --dry-run --json` writes nothing, and lists exactly the tensors, dtypes and shapes
    that the merge writes."""
    from safetensors import safe_open

    from tests.conftest import ADAPTERS, BASES, run_cli

    out = tmp_path / "out"
    args = [str(BASES / "llama-sharded"), str(ADAPTERS / "llama-rslora-patterns"), str(out)]
    dry = run_cli("merge", *args, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] is True and planned["schema_version"] == 1
    assert {t["action"] for shard in planned["shards"].values() for t in shard} == {"copy", "merge"}
    text = run_cli("merge", *args, "--dry-run")
    assert text.returncode == 0 and text.stdout.startswith(f"would write {out}:")

    done = run_cli("merge", *args, "--quiet")
    assert done.returncode == 0, done.stderr
    for shard, tensors in planned["shards"].items():
        with safe_open(out / shard, "pt") as f:
            assert list(f.keys()) == sorted(t["name"] for t in tensors)
            for t in tensors:
                assert list(f.get_slice(t["name"]).get_shape()) == t["shape"]
                assert f.get_slice(t["name"]).get_dtype() == t["dtype"]
