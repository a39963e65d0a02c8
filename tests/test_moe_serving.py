"""MoE expert LoRA in front of the serving runtimes: `validate --target vllm` (vLLM's 2-D / 3-D
expert rules) and `export` (llama.cpp's stacked ffn_*_exps LoRA tensors), the GGUF read back with
gguf.GGUFReader and held against PEFT's merge_and_unload as transformers saves it."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from tests.merged import merged_tensors
from tests.test_moe import build, make_adapter, peft_reference


def _findings(result) -> list[str]:
    return [f["code"] for f in json.loads(result.stdout)["results"][0]["findings"]]


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """PEFT target_parameters adapters (fused experts + q/v) for a family vLLM holds per expert
    (qwen3_moe) and one it holds 3-D (gpt_oss)."""
    root = tmp_path_factory.mktemp("fused")
    for model_type in ("qwen3_moe", "gpt_oss"):
        make_adapter(model_type, root / model_type)
    make_adapter("gpt_oss", root / "gpt_oss-down", target_parameters=["mlp.experts.down_proj"])
    return root


def test_vllm_reads_fused_experts_only_for_3d_models(fused):
    on_2d = run_cli("validate", "--json", fused / "qwen3_moe", "--target", "vllm")
    assert on_2d.returncode != 0 and _findings(on_2d) == ["vllm-experts"], on_2d.stdout
    message = json.loads(on_2d.stdout)["results"][0]["findings"][0]["message"]
    assert "Qwen3MoeForCausalLM" in message and "gpt_oss" in message and "loratools merge" in message

    on_3d = run_cli("validate", "--json", fused / "gpt_oss", "--target", "vllm", "--strict")
    assert on_3d.returncode == 0 and _findings(on_3d) == [], on_3d.stdout
    # serving it with --lora-target-modules must name the experts module
    assert "experts" in json.loads(on_3d.stdout)["serving"]["target_modules"]

    # vLLM asserts both halves of the fused pair
    unpaired = run_cli("validate", "--json", fused / "gpt_oss-down", "--target", "vllm")
    assert unpaired.returncode != 0 and _findings(unpaired) == ["vllm-experts"], unpaired.stdout
    assert "gate_up_proj and down_proj" in unpaired.stdout

    # releases whose MoE loader was not read: a warning that says so, never a verdict
    older = run_cli("validate", "--json", fused / "qwen3_moe", "--target", "vllm@0.32.0")
    assert older.returncode == 0 and _findings(older) == ["vllm-experts"], older.stdout
    assert "not checked" in older.stdout
    sglang = run_cli("validate", "--json", fused / "gpt_oss", "--target", "sglang")
    assert _findings(sglang) == ["sglang-experts"], sglang.stdout


def _per_expert_adapter(path, model_class: str):
    """A transformers-4 style adapter: LoRA on experts.N.gate_proj modules (2-D), recorded for `model_class`."""
    from safetensors.numpy import save_file

    path.mkdir()
    gen = np.random.default_rng(0)
    tensors = {}
    for e in range(2):
        key = f"base_model.model.model.layers.0.mlp.experts.{e}.gate_proj"
        tensors[f"{key}.lora_A.weight"] = gen.standard_normal((2, 8)).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = gen.standard_normal((6, 2)).astype(np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["gate_proj"],
        "auto_mapping": {"base_model_class": model_class}}))


def test_vllm_per_expert_modules(tmp_path):
    _per_expert_adapter(tmp_path / "on2d", "Qwen3MoeForCausalLM")
    ok = run_cli("validate", "--json", tmp_path / "on2d", "--target", "vllm", "--strict")
    assert ok.returncode == 0 and "vllm-experts" not in _findings(ok), ok.stdout
    _per_expert_adapter(tmp_path / "on3d", "Qwen3VLMoeForConditionalGeneration")
    refused = run_cli("validate", "--json", tmp_path / "on3d", "--target", "vllm")
    assert refused.returncode != 0 and _findings(refused) == ["vllm-experts"], refused.stdout
    assert "per-expert" in refused.stdout


# on-disk per-expert names of (gate, up, down), as transformers saves the merged model
DISK = {"qwen3_moe": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj"),
        "mixtral": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3", "block_sparse_moe.experts.{e}.w2")}
GGUF_EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


@pytest.mark.parametrize("model_type,arch", [("qwen3_moe", "qwen3moe"), ("mixtral", "llama")])
def test_export_stacks_fused_experts_as_llama_cpp_does(tmp_path, model_type, arch):
    """Each expert's lora_b[e] · lora_a[e] · alpha/r is PEFT's merged ΔW of that expert's gate, up
    and down weight (rsLoRA: the scaling folded into B)."""
    build(model_type).save_pretrained(str(tmp_path / "base"))
    make_adapter(model_type, tmp_path / "fused", use_rslora=True)
    out = tmp_path / "a.gguf"
    result = run_cli("export", tmp_path / "fused", out, "--base", tmp_path / "base", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["architecture"] == arch and len(report["rescaled"]) == 2 * 2 + 2 * 2  # q, v and 2 expert params, 2 layers

    peft_reference(model_type, tmp_path / "base", tmp_path / "fused", tmp_path / "ref", run=False)
    merged, base = merged_tensors(tmp_path / "ref"), merged_tensors(tmp_path / "base")
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    assert len(tensors) == 2 * (2 * 2 + 3 * 2)
    for layer in range(2):
        for gguf_name, disk in zip(GGUF_EXPERTS, DISK[model_type]):
            a, b = tensors[f"blk.{layer}.{gguf_name}.weight.lora_a"], tensors[f"blk.{layer}.{gguf_name}.weight.lora_b"]
            assert a.ndim == 3 and a.shape[:2] == (4, 2) and b.shape[0] == 4 and b.shape[2] == 2  # (E, r, in), (E, out, r)
            for e in range(4):
                key = f"model.layers.{layer}.{disk.format(e=e)}.weight"
                expected = (merged[key] - base[key]).double().numpy()
                got = (b[e].astype(np.float64) @ a[e]) * alpha / b.shape[2]
                np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6, err_msg=key)


def test_export_refuses_gpt_oss_experts(fused, tmp_path):
    from loratools import api
    from loratools.errors import UnsupportedError

    build("gpt_oss").save_pretrained(str(tmp_path / "base"))
    with pytest.raises(UnsupportedError) as refused:
        api.export(str(fused / "gpt_oss"), tmp_path / "a.gguf", base=tmp_path / "base")
    assert refused.value.code == "export-unsupported" and "gpt_oss" in str(refused.value)
    assert not (tmp_path / "a.gguf").exists()
    cli = run_cli("export", fused / "gpt_oss", tmp_path / "a.gguf", "--base", tmp_path / "base")
    assert cli.returncode != 0 and cli.stderr.count("\n") == 1 and "Traceback" not in cli.stderr
    served = run_cli("validate", "--json", fused / "gpt_oss", "--target", "llama.cpp")
    assert "llamacpp-unsupported" in _findings(served), served.stdout
    # a --base-arch the adapter's recorded class contradicts
    wrong = run_cli("export", fused / "qwen3_moe", tmp_path / "b.gguf", "--base-arch", "mixtral")
    assert wrong.returncode != 0 and "Qwen3MoeForCausalLM" in wrong.stderr and "Traceback" not in wrong.stderr


def test_llama_cpp_applies_exported_expert_lora_as_peft_does(tmp_path):
    """End to end in llama.cpp itself (llama-cpp-python): a tiny Mixtral written as GGUF (llama.cpp's
    LLaMA with experts), the exported fused-experts adapter beside it, logits against PEFT's model."""
    import llama_cpp

    from tests.llama_gguf import write_llama_gguf

    model = build("mixtral")
    model.save_pretrained(str(tmp_path / "base"))
    write_llama_gguf(model, tmp_path / "base.gguf")
    # the experts alone, so that all the change is the expert LoRA's
    peft_model = make_adapter("mixtral", tmp_path / "adapter", target_modules=(), use_rslora=True).eval()
    ids = [5, 9, 33, 12, 7, 11, 60, 40]
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor([ids])).logits[0].numpy()
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    result = run_cli("export", tmp_path / "adapter", tmp_path / "adapter.gguf", "--base", tmp_path / "base")
    assert result.returncode == 0, result.stderr

    def run(**lora):
        llm = llama_cpp.Llama(model_path=str(tmp_path / "base.gguf"), n_ctx=64, logits_all=True, verbose=False,
                              n_threads=1, **lora)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])

    plain, adapted = run(), run(lora_path=str(tmp_path / "adapter.gguf"))
    assert np.abs(plain - base_logits).max() < 1e-3  # the GGUF base is the same model
    assert np.abs(expected - base_logits).max() > 0.2  # the expert LoRA moves the logits ...
    assert np.abs(adapted - expected).max() < 2e-3, np.abs(adapted - expected).max()  # ... and llama.cpp by PEFT's ΔW
