"""`loratools convert` between LLaMA, GPT-2 and BERT naming: every role's ΔW unchanged."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

import loratools
from loratools.arch import Role, locate
from tests.conftest import ADAPTERS, BASES, assert_clean_error, run_cli
from tests.peft_ref import peft_merged_state_dict, peft_model
from tests.merged import assert_matches_peft, merged_tensors

QKV = (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V)


def role_deltas(adapter) -> dict[tuple, torch.Tensor]:
    """(layer, role) -> ΔW = s·B@A in nn.Linear orientation (float64), fused q,k,v split by rows."""
    out = {}
    det = adapter.detection
    for path, module in adapter.modules.items():
        ref = locate(det.architecture, det.prefix, path)
        a, b = (t.double() for t in adapter.factors(path))
        delta = module.scaling * b @ a
        if ref.role is Role.ATTN_QKV:
            for role, part in zip(QKV, delta.chunk(3, dim=0)):
                out[(ref.layer, role)] = part
        else:
            out[(ref.layer, ref.role)] = delta
    return out


# ---- tiny models with the target's naming and the source's dimensions -------------------------


def llama(hidden=16, intermediate=24, kv=4, bias=False):
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv,
                                              attention_bias=bias, mlp_bias=bias)).eval()


def gpt2(hidden=16, inner=None):
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=hidden, n_inner=inner, n_layer=2, n_head=4,
                                            n_positions=64, bos_token_id=0, eos_token_id=0)).eval()


def bert(hidden=16, intermediate=24):
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate,
                                                          num_hidden_layers=2, num_attention_heads=4, num_labels=3)).eval()


@pytest.fixture(scope="module")
def llama_mha_adapter(tmp_path_factory):
    """A PEFT adapter on a LLaMA without grouped-query attention and without gate_proj targets."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("llama-mha") / "adapter"
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                     init_lora_weights=False, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3})
    get_peft_model(llama(), cfg).save_pretrained(str(out))
    return out


CASES = {
    # name: (source adapter, --to, extra args, model for the output, model for the source)
    "gpt2-to-llama": ("gpt2-conv1d", "llama", [], lambda: llama(intermediate=64), lambda: gpt2()),
    "llama-to-gpt2": (None, "gpt2", [], lambda: gpt2(inner=24), lambda: llama()),
    # BERT's trained q/v biases (bias="lora_only") need a LLaMA with biases to land in
    "bert-to-llama": ("bert-modules-to-save", "llama", ["--drop-unmapped"], lambda: llama(bias=True), lambda: bert()),
    "llama-to-bert": (None, "bert", [], lambda: bert(), lambda: llama()),
    "gpt2-to-bert": ("gpt2-conv1d", "bert", ["--prefix", "sequence-classification"], lambda: bert(intermediate=64), lambda: gpt2()),
}


def _source(name, llama_mha_adapter):
    return llama_mha_adapter if CASES[name][0] is None else ADAPTERS / CASES[name][0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_role_deltas_are_unchanged(name, tmp_path, llama_mha_adapter):
    source, to, extra, _, _ = CASES[name]
    src = _source(name, llama_mha_adapter)
    out = tmp_path / "out"
    result = run_cli("convert", src, out, "--to", to, *extra)
    assert result.returncode == 0, result.stderr
    before, after = role_deltas(loratools.load_adapter(src)), role_deltas(loratools.load_adapter(out))
    assert loratools.load_adapter(out).architecture == to
    assert set(after) == set(before)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-6, atol=1e-7, msg=str(key))


def _lora_contributions(model, x_by_in: dict[int, torch.Tensor]) -> dict[tuple, torch.Tensor]:
    """(layer, role) -> what each LoRA layer adds to its base layer's output for a fixed input."""
    from peft.tuners.lora import LoraLayer

    out = {}
    inner = model.base_model.model
    paths = [n for n, m in inner.named_modules() if isinstance(m, LoraLayer)]
    arch = loratools.arch.detect_from_paths(paths, class_name=type(inner).__name__)
    for name, module in inner.named_modules():
        if not isinstance(module, LoraLayer) or module.lora_embedding_A:
            continue
        ref = locate(arch.architecture, arch.prefix, name)
        base = module.get_base_layer()
        in_features = base.weight.shape[0] if ref.layout.value == "conv1d" else base.weight.shape[1]
        x = x_by_in.setdefault(in_features, torch.randn(3, in_features, generator=torch.Generator().manual_seed(in_features)))
        with torch.no_grad():
            delta = module(x) - base(x)
        if ref.role is Role.ATTN_QKV:
            for role, part in zip(QKV, delta.chunk(3, dim=-1)):
                out[(ref.layer, role)] = part
        else:
            out[(ref.layer, ref.role)] = delta
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_loads_the_output_and_projections_agree(name, tmp_path, llama_mha_adapter):
    _, to, extra, target_model, source_model = CASES[name]
    src = _source(name, llama_mha_adapter)
    out = tmp_path / "out"
    assert run_cli("convert", src, out, "--to", to, *extra).returncode == 0
    converted = peft_model(target_model, out)  # asserts no missing / unexpected keys
    original = peft_model(source_model, src)
    xs: dict[int, torch.Tensor] = {}
    ours, theirs = _lora_contributions(converted, xs), _lora_contributions(original, xs)
    assert set(ours) == set(theirs) and ours
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=str(key))


def test_gpt2_llama_gpt2_round_trip_merges_like_peft(tmp_path):
    assert run_cli("convert", ADAPTERS / "gpt2-conv1d", tmp_path / "llama").returncode == 0
    assert run_cli("convert", tmp_path / "llama", tmp_path / "back", "--to", "gpt2").returncode == 0
    back = loratools.load_adapter(tmp_path / "back")
    assert back.config.fan_in_fan_out and {m.rank for p, m in back.modules.items() if p.endswith("c_attn")} == {12}
    assert run_cli("merge", BASES / "gpt2", tmp_path / "back", tmp_path / "merged").returncode == 0
    assert_matches_peft(merged_tensors(tmp_path / "merged"), peft_merged_state_dict("gpt2", BASES / "gpt2", ADAPTERS / "gpt2-conv1d"))


def test_biases_follow_their_module(tmp_path):
    """lora_B.bias is sliced with c_attn's rows and re-joined with each piece's scaling folded in."""
    assert run_cli("convert", ADAPTERS / "gpt2-lora-bias", tmp_path / "llama").returncode == 0
    assert run_cli("convert", tmp_path / "llama", tmp_path / "back", "--to", "gpt2").returncode == 0
    original, back = loratools.load_adapter(ADAPTERS / "gpt2-lora-bias"), loratools.load_adapter(tmp_path / "back")
    for path, module in original.modules.items():
        mine = back.modules[path]
        torch.testing.assert_close(back.tensor(mine.lora_bias_key) * mine.scaling, original.tensor(module.lora_bias_key) * module.scaling)
    peft_model(lambda: gpt2(), tmp_path / "back")
    # bias="lora_only": BERT's trained query/value biases move with their modules
    assert run_cli("convert", ADAPTERS / "bert-modules-to-save", tmp_path / "from-bert", "--drop-unmapped").returncode == 0
    bert_a, llama_a = loratools.load_adapter(ADAPTERS / "bert-modules-to-save"), loratools.load_adapter(tmp_path / "from-bert")
    assert torch.equal(bert_a.tensor("base_model.model.bert.encoder.layer.1.attention.self.value.base_layer.bias"),
                       llama_a.tensor("base_model.model.model.layers.1.self_attn.v_proj.base_layer.bias"))


def test_dora_magnitudes_follow_their_module(tmp_path):
    assert run_cli("convert", ADAPTERS / "llama-dora", tmp_path / "bert", "--to", "bert").returncode == 0
    src, out = loratools.load_adapter(ADAPTERS / "llama-dora"), loratools.load_adapter(tmp_path / "bert")
    assert out.config.use_dora
    assert torch.equal(src.tensor(src.modules["model.layers.0.mlp.up_proj"].magnitude_key),
                       out.tensor(out.modules["bert.encoder.layer.0.intermediate.dense"].magnitude_key))
    # joining q, v (no k) into c_attn would need k's magnitude, which depends on the base weights
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4)
    cfg = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    get_peft_model(llama(), cfg).save_pretrained(str(tmp_path / "dora-qv"))
    result = run_cli("convert", tmp_path / "dora-qv", tmp_path / "gpt2", "--to", "gpt2")
    assert_clean_error(result, "magnitude", "attn_k")
    assert not (tmp_path / "gpt2").exists()


def test_missing_k_becomes_a_zero_block(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(str(tmp_path / "qv"))
    assert run_cli("convert", tmp_path / "qv", tmp_path / "gpt2", "--to", "gpt2").returncode == 0
    deltas = role_deltas(loratools.load_adapter(tmp_path / "gpt2"))
    assert torch.count_nonzero(deltas[(0, Role.ATTN_K)]) == 0
    before = role_deltas(loratools.load_adapter(tmp_path / "qv"))
    torch.testing.assert_close(deltas[(0, Role.ATTN_V)], before[(0, Role.ATTN_V)])


def test_unmappable_modules_are_listed(tmp_path):
    result = run_cli("convert", ADAPTERS / "llama-basic", tmp_path / "out", "--to", "bert")
    assert_clean_error(result, "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj", "--drop-unmapped", code=1)
    result = run_cli("convert", ADAPTERS / "bert-modules-to-save", tmp_path / "out")
    assert_clean_error(result, "classifier.weight", "classifier.bias")
    assert not (tmp_path / "out").exists()
    result = run_cli("convert", ADAPTERS / "llama-basic", tmp_path / "out", "--to", "bert", "--drop-unmapped", "--json")
    report = json.loads(result.stdout)
    assert sorted(report["dropped"]) == ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]


def test_grouped_query_attention_cannot_be_fused(tmp_path):
    result = run_cli("convert", ADAPTERS / "llama-basic", tmp_path / "out", "--to", "gpt2", "--drop-unmapped")
    assert_clean_error(result, "layer 0", "out=16", "out=8", "grouped-query", code=1)
    assert not (tmp_path / "out").exists()


def test_config_is_rewritten(tmp_path):
    assert run_cli("convert", ADAPTERS / "gpt2-conv1d", tmp_path / "out", "--base-model", "org/tiny-llama").returncode == 0
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is False and cfg["base_model_name_or_path"] == "org/tiny-llama"
    assert "model.layers.0.self_attn.q_proj" in cfg["target_modules"] and cfg["lora_dropout"] == 0.0
    assert cfg["task_type"] is None and cfg["peft_type"] == "LORA"
    assert run_cli("convert", ADAPTERS / "llama-rslora-patterns", tmp_path / "b", "--to", "bert").returncode == 0
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] is None and cfg["use_rslora"] is True


def test_prefix_selects_the_head(tmp_path):
    assert run_cli("convert", ADAPTERS / "gpt2-conv1d", tmp_path / "out", "--prefix", "base").returncode == 0
    paths = list(loratools.load_adapter(tmp_path / "out").modules)
    assert all(p.startswith("layers.") for p in paths)
    assert_clean_error(run_cli("convert", ADAPTERS / "gpt2-conv1d", tmp_path / "x", "--prefix", "nope"), "no head 'nope'")
