"""Adapters PEFT merges that loratools used to refuse (VeLoRA, MonteCLoRA, BD-LoRA, GPT-NeoX's
embed_out, Nemotron-H, Conv2d LoRA): each made by real PEFT on a tiny seeded float32 model and
merged by `loratools merge`, then compared with PEFT's merge_and_unload on the same files — or
refused in one line naming the true reason."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import assert_clean_error, run_cli
from tests.merged import assert_matches_peft, merged_tensors
from tests.peft_ref import load_base, outputs, peft_model
from tests.test_real_world import _lora_config, merge_matches_peft, peft_adapter
from tests.tiny_models import build_base


def llama():
    return build_base("llama")


def adapter_tensors(adapter_dir) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def assert_plain_delta(ours: dict, base: dict, adapter_dir, modules: list[str], scaling: float) -> None:
    """Every merged module is W + s·B·A of the saved factors (float32 round-off), so PEFT's merge
    (which `ours` equals) is exactly the plain LoRA of the file."""
    saved = adapter_tensors(adapter_dir)
    for module in modules:
        a = saved[f"base_model.model.{module}.lora_A.weight"]
        b = saved[f"base_model.model.{module}.lora_B.weight"]
        delta = scaling * (b @ a)
        assert delta.abs().max() > 1e-3, module  # the adapter changes the weight
        torch.testing.assert_close(ours[f"{module}.weight"], base[f"{module}.weight"] + delta, rtol=1e-6, atol=1e-6)


# ---- 1. VeLoRA and MonteCLoRA: s·B·A outside a training step -----------------------------------

TRAINING_STATE_VARIANTS = [
    ("velora", lambda: {"velora_config": _lora_config("VeloraConfig", num_groups=4, init_type="random")}, "lora_velora_embed"),
    ("velora", lambda: {"velora_config": _lora_config("VeloraConfig", num_groups=2)}, "lora_velora_embed"),
    ("monteclora", lambda: {"monteclora_config": _lora_config("MontecloraConfig")}, "lora_monteclora_sampler"),
]


@pytest.mark.parametrize("variant,config,own_tensor", TRAINING_STATE_VARIANTS)
def test_training_state_variants_merge_as_peft(tmp_path, variant, config, own_tensor):
    """PEFT merges VeLoRA and MonteCLoRA with get_delta_weight = s·B·A and serves them (eval) as
    plain LoRA; their own tensors (VeLoRA's projection, MonteCLoRA's sampler, here randomised too)
    act only in a training step."""
    base_dir, adapter_dir = peft_adapter(tmp_path, llama, target_modules=["q_proj", "v_proj", "down_proj"], **config())
    assert any(own_tensor in key for key in adapter_tensors(adapter_dir))
    ours, base = merge_matches_peft(tmp_path, base_dir, adapter_dir)
    modules = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert_plain_delta(ours, base, adapter_dir, modules, scaling=2.0)
    # transformers loads OUT and computes what the unmerged PEFT model computes
    torch.testing.assert_close(outputs(load_base("llama", tmp_path / "out"), "llama"),
                               outputs(peft_model(llama, adapter_dir), "llama"), rtol=1e-4, atol=1e-5)

    info = json.loads(run_cli("info", adapter_dir, "--json").stdout)
    assert info["variants"] == [variant] and info["unknown_keys"] == [] and info["refusals"]["merge"] == []
    assert info["variant_keys"] and all(own_tensor in k for k in info["variant_keys"])
    assert run_cli("validate", adapter_dir, "--base", base_dir).returncode == 0
    assert run_cli("svd", adapter_dir).returncode == 0
    assert run_cli("export", adapter_dir, tmp_path / "a.gguf", "--base", base_dir).returncode == 0
    # A rewritten adapter would lose the variant's own tensors: refused with that reason.
    result = run_cli("resize", adapter_dir, tmp_path / "r", "--rank", "1")
    assert_clean_error(result, f"LoRA variant {variant}", "training-only tensors", code=1)
    assert not (tmp_path / "r").exists()


# ---- 2. BD-LoRA: the block-diagonal factor is saved as its diagonal blocks -----------------------

@pytest.mark.parametrize("bd", [{"target_modules_bd_a": ["o_proj", "down_proj"]},
                                {"target_modules_bd_a": ["o_proj", "down_proj"], "target_modules_bd_b": ["q_proj", "up_proj"]}],
                         ids=["A", "A-and-B"])
def test_bdlora_merges_as_peft(tmp_path, bd):
    """PEFT saves a block-diagonal lora_A as [r, in/nblocks] (lora_B as [out, r/nblocks]) — its
    blocks stacked — and merges s·B·block_diag(A) (s·block_diag(B)·A): not s·B·A of the saved
    tensors, which do not even multiply to the weight's shape. loratools expands the blocks on
    reading and merges PEFT's weights; rewriting the adapter is refused (it would lose the blocks)."""
    from tests.peft_ref import peft_merged_state_dict

    targets = ["o_proj", "down_proj", *bd.get("target_modules_bd_b", [])]
    config = _lora_config("BdLoraConfig", nblocks=2, **bd)
    base_dir, adapter_dir = peft_adapter(tmp_path, llama, target_modules=targets, use_bdlora=config)
    saved, base = adapter_tensors(adapter_dir), merged_tensors(base_dir)
    reference = peft_merged_state_dict("llama", base_dir, adapter_dir)
    module = "model.layers.0.self_attn.o_proj"
    a, b = saved[f"base_model.model.{module}.lora_A.weight"], saved[f"base_model.model.{module}.lora_B.weight"]
    assert list(a.shape) == [2, 8] and list(b.shape) == [16, 2]  # the weight is [16, 16]
    delta = 2.0 * b @ torch.block_diag(*torch.chunk(a, 2, dim=0))
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(reference[f"{module}.weight"], base[f"{module}.weight"] + delta, rtol=1e-6, atol=1e-6)
    if "target_modules_bd_b" in bd:
        assert list(saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape) == [16, 1]

    ours, _ = merge_matches_peft(tmp_path, base_dir, adapter_dir)
    changed = {k for k in ours if not torch.equal(ours[k], base[k])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in
                       ("self_attn.o_proj", "mlp.down_proj", *(("self_attn.q_proj", "mlp.up_proj") if "target_modules_bd_b" in bd else ()))}
    torch.testing.assert_close(outputs(load_base("llama", tmp_path / "out"), "llama"),
                               outputs(peft_model(llama, adapter_dir), "llama"), rtol=1e-4, atol=1e-5)
    assert run_cli("validate", adapter_dir, "--base", base_dir).returncode == 0
    info = json.loads(run_cli("info", adapter_dir, "--json").stdout)
    assert info["variants"] == ["bdlora"] and info["unknown_keys"] == [] and info["refusals"]["merge"] == []
    shapes = {m["name"]: m["weight_shape"] for m in info["modules"]}
    assert shapes[module] == [16, 16]
    svd = json.loads(run_cli("svd", adapter_dir, "--json").stdout)
    sigma = next(m["singular_values"] for m in svd["modules"] if m["name"] == module)
    torch.testing.assert_close(torch.tensor(sigma, dtype=torch.float64), torch.linalg.svdvals(delta.double())[:2], rtol=1e-4, atol=1e-6)
    # export writes the expanded (plain) factors, which llama.cpp applies as a plain LoRA
    assert run_cli("export", adapter_dir, tmp_path / "a.gguf", "--base", base_dir).returncode == 0
    import gguf

    written = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(str(tmp_path / "a.gguf")).tensors}
    torch.testing.assert_close(written["blk.0.attn_output.weight.lora_a"].reshape(2, 16), torch.block_diag(*torch.chunk(a, 2, dim=0)),
                               rtol=0, atol=0)
    result = run_cli("resize", adapter_dir, tmp_path / "r", "--rank", "1")
    assert_clean_error(result, "BD-LoRA", "nblocks=2", "a rewritten adapter would have to keep that structure", code=1)
    assert not (tmp_path / "r").exists()


# ---- 3. GPT-NeoX's head: the module lm_head, saved as embed_out ---------------------------------

def tiny_neox():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.AutoConfig.for_model("gpt_neox", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("lora", [
    {"target_modules": ["query_key_value", "lm_head"]},
    {"target_modules": ["query_key_value"], "modules_to_save": ["lm_head"]},
])
def test_gpt_neox_head_merges_as_peft(tmp_path, lora):
    """transformers' GPTNeoXForCausalLM calls its head lm_head (PEFT's adapter keys) but saves it
    as embed_out.weight, the name of older checkpoints; the head is found under either name."""
    from tests.peft_ref import peft_merged_state_dict

    base_dir, adapter_dir = peft_adapter(tmp_path, tiny_neox, trained=("lora_", "modules_to_save"), **lora)
    base = merged_tensors(base_dir)
    assert "embed_out.weight" in base and "lm_head.weight" not in base
    assert any(".lm_head." in key for key in adapter_tensors(adapter_dir))
    result = run_cli("merge", base_dir, adapter_dir, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    ours = merged_tensors(tmp_path / "out")
    assert set(ours) == set(base)  # OUT keeps the base's names
    ours["lm_head.weight"] = ours.pop("embed_out.weight")  # what transformers loads it as
    assert (ours["lm_head.weight"] - base["embed_out.weight"]).abs().max() > 1e-3  # the head changed
    assert_matches_peft(ours, peft_merged_state_dict("llama", base_dir, adapter_dir))  # AutoModelForCausalLM
    torch.testing.assert_close(outputs(load_base("llama", tmp_path / "out"), "llama"),
                               outputs(peft_model(tiny_neox, adapter_dir), "llama"), rtol=1e-4, atol=1e-5)
    assert run_cli("validate", adapter_dir, "--base", base_dir).returncode == 0


# ---- 4. Nemotron-H: hybrid Mamba-2 / attention / MLP mixers, saved under backbone. ---------------

def tiny_nemotron_h():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.AutoConfig.for_model(
        "nemotron_h", vocab_size=64, hidden_size=16, num_hidden_layers=4, hybrid_override_pattern="M*-M",
        num_attention_heads=4, num_key_value_heads=2, head_dim=4, intermediate_size=32, mamba_num_heads=4,
        mamba_head_dim=8, ssm_state_size=8, n_groups=1, conv_kernel=4, expand=2, chunk_size=16, tie_word_embeddings=False,
    )
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def test_nemotron_h_merges_as_peft(tmp_path):
    """Layers 0 and 3 are Mamba-2 (in_proj), 1 attention, 2 an MLP; transformers' module tree is
    model.layers.{i}.mixer.*, its checkpoint backbone.layers.{i}.mixer.*. (PEFT refuses LoRA on a
    Mamba out_proj or conv1d: the fused kernel reads their weights directly.)"""
    from tests.peft_ref import peft_merged_state_dict

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "in_proj"]
    base_dir, adapter_dir = peft_adapter(tmp_path, tiny_nemotron_h, target_modules=targets)
    base = merged_tensors(base_dir)
    assert all(k.startswith(("backbone.", "lm_head.")) for k in base)
    info = json.loads(run_cli("info", adapter_dir, "--json").stdout)
    assert info["architecture"] == "nemotron_h" and info["roles"] == {
        "attn_q": 1, "attn_k": 1, "attn_v": 1, "attn_out": 1, "ffn_up": 1, "ffn_down": 1, "ssm_in": 2}
    result = run_cli("merge", base_dir, adapter_dir, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    ours = merged_tensors(tmp_path / "out")
    assert set(ours) == set(base)
    ours = {("model." + k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in ours.items()}
    reference = peft_merged_state_dict("llama", base_dir, adapter_dir)  # AutoModelForCausalLM
    assert_matches_peft(ours, reference)
    changed = {k for k in ours if not torch.equal(ours[k], base[k.replace("model.", "backbone.", 1)])}
    assert changed == {f"model.layers.{i}.mixer.{m}.weight" for i, ms in
                       ((0, ("in_proj",)), (1, ("q_proj", "k_proj", "v_proj", "o_proj")), (2, ("up_proj", "down_proj")),
                        (3, ("in_proj",))) for m in ms}
    torch.testing.assert_close(outputs(load_base("llama", tmp_path / "out"), "llama"),
                               outputs(peft_model(tiny_nemotron_h, adapter_dir), "llama"), rtol=1e-4, atol=1e-5)
    assert run_cli("validate", adapter_dir, "--base", base_dir).returncode == 0


# ---- 5. Conv2d LoRA: merged as PEFT merges it (more in tests/test_conv2d.py) ---------------------

class TinyConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.proj = torch.nn.Conv2d(6, 5, 1)

    def forward(self, x):
        return self.proj(self.conv(x))


@pytest.mark.parametrize("target,kernel", [("conv", 3), ("proj", 1)])
def test_conv2d_lora_merges_as_peft(tmp_path, target, kernel):
    """PEFT's Conv2d LoRA (lora_A a kxk Conv2d to r channels, lora_B 1x1): its merge is
    ΔW[o, i] = s·Σ_r B[o, r]·A[r, i] at every kernel position — checked here —, which loratools
    merges (a bare .safetensors base, the module found by its path) to PEFT's weights."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = TinyConvNet().eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(base, str(tmp_path / "base.safetensors"), metadata={"format": "pt"})
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=[target]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.3)
    peft.save_pretrained(str(tmp_path / "adapter"))
    saved = adapter_tensors(tmp_path / "adapter")
    a, b = saved[f"base_model.model.{target}.lora_A.weight"], saved[f"base_model.model.{target}.lora_B.weight"]
    assert a.dim() == 4 and a.shape[2:] == (kernel, kernel) and b.shape[2:] == (1, 1)
    merged = peft.merge_and_unload().state_dict()
    delta = 2.0 * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(merged[f"{target}.weight"], base[f"{target}.weight"] + delta, rtol=1e-6, atol=1e-6)

    result = run_cli("merge", tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    ours = merged_tensors(tmp_path / "out")
    assert_matches_peft(ours, merged)
    assert {k for k in ours if not torch.equal(ours[k], base[k])} == {f"{target}.weight"}
    assert run_cli("validate", tmp_path / "adapter", "--base", tmp_path / "base.safetensors").returncode == 0


@pytest.mark.parametrize("bd,code,fragment", [
    ({"nblocks": 3, "target_modules_bd_a": ["o_proj"]}, "bdlora-blocks", "nblocks=3 must divide its 2 rows"),
    ({"nblocks": 2, "target_modules_bd_a": ["o_proj"], "target_modules_bd_b": ["proj"]}, "config-field",
     "matches both target_modules_bd_a and target_modules_bd_b"),
])
def test_bdlora_blocks_that_do_not_fit(tmp_path, bd, code, fragment):
    """Blocks PEFT could not have saved: validate names the module, merge refuses in one line."""
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["o_proj"], "use_bdlora": bd}))
    key = "base_model.model.model.layers.0.self_attn.o_proj"
    save_file({f"{key}.lora_A.weight": torch.ones(2, 8), f"{key}.lora_B.weight": torch.ones(16, 2)},
              str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    findings = json.loads(run_cli("validate", adapter, "--json").stdout)["results"][0]["findings"]
    assert [(f["code"], f["module"]) for f in findings] == [(code, "model.layers.0.self_attn.o_proj")]
    assert fragment in findings[0]["message"]
    assert_clean_error(run_cli("svd", adapter), fragment, code=1)
