"""`loratools export`: GGUF LoRA adapters for llama.cpp, read back with gguf.GGUFReader and
checked against PEFT's ΔW per module."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from tests.conftest import assert_clean_error, run_cli



def _tiny(family: str, tie: bool = False):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)).eval()
    return tf.LlamaForCausalLM(tf.LlamaConfig(**common)).eval()


def _adapter(tmp_path, family: str, tie: bool = False, **lora):
    """A PEFT adapter with every per-module scaling rule llama.cpp lacks, on every weight it adapts."""
    from peft import LoraConfig, get_peft_model

    model = _tiny(family, tie)
    model.config.save_pretrained(tmp_path / "base")
    config = dict(r=4, lora_alpha=8, init_lora_weights=False, use_rslora=True,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"],
                  rank_pattern={"layers.1.self_attn.q_proj": 6, "down_proj": 2}, alpha_pattern={"k_proj": 3, "embed_tokens": 16})
    config.update(lora)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(**config))
    peft_model.save_pretrained(tmp_path / "adapter")
    deltas = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and ("lora_A" in dir(module)) and "default" in getattr(module, "r", {}):
            deltas[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").detach().float().numpy()
    return tmp_path / "adapter", tmp_path / "base", deltas


def _rope_order(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter order of q/k rows, written out index by index: within a head of
    size d, HF row half*(d/2)+i becomes row 2i+half."""
    d = rows.shape[0] // heads
    out = np.empty_like(rows)
    for h in range(heads):
        for half in range(2):
            for i in range(d // 2):
                out[h * d + 2 * i + half] = rows[h * d + half * (d // 2) + i]
    return out


def _read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    return fields, tensors


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(path: str) -> str:
    if path == "lm_head":
        return "output.weight"
    if path.endswith("embed_tokens"):
        return "token_embd.weight"
    layer = path.split(".")[2]
    return f"blk.{layer}.{GGUF_NAMES[path.split('.', 3)[3]]}.weight"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_export_matches_peft_delta_per_module(tmp_path, family):
    adapter, base, deltas = _adapter(tmp_path, family)
    out = tmp_path / "adapter.gguf"
    result = run_cli("export", adapter, out, "--base", base, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    fields, tensors = _read(out)
    assert fields["general.architecture"] == family and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    assert len(deltas) == 16 and len(tensors) == 2 * 16 == report["tensors"]
    alpha = fields["adapter.lora.alpha"]
    for path, expected in deltas.items():
        name = _gguf_name(path)
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        scale = alpha / b.shape[1]  # llama.cpp: alpha / rank, rank = lora_b's ne[0]
        if path.endswith("embed_tokens"):
            got = (a @ b.T) * scale  # row t: lora_b · lora_a[t]
        else:
            got = (b @ a) * scale
            if family == "llama" and path.endswith(("q_proj", "k_proj")):
                expected = _rope_order(expected, 4 if path.endswith("q_proj") else 2)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7, err_msg=path)
    assert (family == "llama") == bool(report["permuted"])
    # PEFT saved the base's embedding and head beside their LoRA (save_embedding_layers): left to the model
    assert sorted(report["skipped"]) == ["base_model.model.lm_head.base_layer.weight",
                                         "base_model.model.model.embed_tokens.base_layer.weight"]


def test_plain_adapter_keeps_its_factors(tmp_path):
    """No pattern, no rsLoRA: llama.cpp's alpha/r is PEFT's scaling, B is written as stored."""
    from safetensors.numpy import load_file

    adapter, base, _ = _adapter(tmp_path, "qwen2", use_rslora=False, rank_pattern={}, alpha_pattern={},
                                target_modules=["v_proj", "down_proj"])
    assert run_cli("export", adapter, tmp_path / "a.gguf", "--base", base).returncode == 0
    _, tensors = _read(tmp_path / "a.gguf")
    stored = load_file(str(adapter / "adapter_model.safetensors"))
    b = stored["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert np.array_equal(tensors["blk.1.ffn_down.weight.lora_b"], b)


def test_refusals_are_clean_and_write_nothing(tmp_path):
    adapter, base, _ = _adapter(tmp_path, "llama")
    out = tmp_path / "x.gguf"
    assert_clean_error(run_cli("export", adapter, out), "give --base", code=2)  # q/k rows need the head counts
    assert_clean_error(run_cli("export", adapter, tmp_path / "x.bin", "--base", base), ".gguf", code=2)
    assert_clean_error(run_cli("export", adapter, out, "--base", base, "--base-arch", "gpt2"), "GGUF export knows", code=2)
    dora, _, _ = _adapter(tmp_path / "d", "llama", use_dora=True, target_modules=["v_proj"], rank_pattern={}, alpha_pattern={})
    assert_clean_error(run_cli("export", dora, out, "--base", base), "DoRA has no GGUF LoRA form")
    tied, tied_base, _ = _adapter(tmp_path / "t", "llama", tie=True, target_modules=["lm_head"], rank_pattern={}, alpha_pattern={})
    assert_clean_error(run_cli("export", tied, out, "--base", tied_base), "ties lm_head")
    assert not out.exists() and not list(tmp_path.glob(".x.gguf.tmp-*"))
    assert run_cli("export", adapter, out, "--base", base).returncode == 0
    assert_clean_error(run_cli("export", adapter, out, "--base", base), "exists")


def test_modules_to_save_cannot_be_exported(tmp_path):
    adapter, base, _ = _adapter(tmp_path, "qwen2", target_modules=["v_proj"], modules_to_save=["lm_head"], rank_pattern={},
                                alpha_pattern={})
    assert_clean_error(run_cli("export", adapter, tmp_path / "x.gguf", "--base", base), "modules_to_save", "merge it")


def test_llama_cpp_applies_the_exported_adapter_as_peft_does(tmp_path):
    """End to end in llama.cpp itself (llama-cpp-python): a tiny LLaMA written as GGUF, the
    exported adapter loaded beside it, logits compared with PEFT's model."""
    import llama_cpp
    from peft import LoraConfig, get_peft_model

    from tests.llama_gguf import write_llama_gguf
    from tests.quantized_models import tiny_causal_lm

    model = tiny_causal_lm("llama").float()
    model.save_pretrained(tmp_path / "base")
    write_llama_gguf(model, tmp_path / "base.gguf")
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False, rank_pattern={"down_proj": 2},
                        alpha_pattern={"k_proj": 3}, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                     "up_proj", "down_proj", "embed_tokens", "lm_head"])
    peft_model = get_peft_model(model, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = [5, 9, 33, 2, 7, 11, 64, 100]
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor([ids])).logits[0].numpy()
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert run_cli("export", tmp_path / "adapter", tmp_path / "adapter.gguf", "--base", tmp_path / "base").returncode == 0

    def run(**lora):
        llm = llama_cpp.Llama(model_path=str(tmp_path / "base.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1, **lora)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])

    plain, adapted = run(), run(lora_path=str(tmp_path / "adapter.gguf"))
    assert np.abs(plain - base_logits).max() < 1e-3  # the GGUF base is the same model
    assert np.abs(expected - base_logits).max() > 1.0  # the adapter changes the logits a lot ...
    assert np.abs(adapted - expected).max() < 2e-3  # ... and llama.cpp applies exactly PEFT's change
