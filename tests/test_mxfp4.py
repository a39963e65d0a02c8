"""gpt-oss bases with MXFP4 experts (`*_blocks` + `*_scales`, config.json quant_method mxfp4), as
OpenAI ships them: merge dequantizes them as transformers does (checked bit for bit against
transformers' own convert_moe_packed_tensors), adds PEFT's ΔW and rounds once; transformers
loads OUT as a plain gpt_oss with the PEFT model's logits.

transformers quantizes to MXFP4 only through GPU (triton) kernels, so the test base is quantized
here from the format's definition; what matters is that the decode is transformers' own."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.errors import LoraToolsError
from loratools.formats.checkpoint import open_checkpoint
from loratools.ops import dequant_mxfp4
from tests.conftest import assert_clean_error, run_cli
from tests.merged import merged_tensors
from tests.test_moe import logits

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
DIMS = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_experts_per_tok=2, max_position_embeddings=64, num_local_experts=4, intermediate_size=32)
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
QUANTIZATION = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An (E, in, out) parameter as the checkpoint stores it: per output row, blocks of 32 inputs,
    each with the smallest power-of-two scale that fits its largest magnitude in e2m1 (max 6),
    every value to the nearest code (ties to the even code), two codes a byte, the first low."""
    rows = weight.float().transpose(1, 2)  # (E, out, in)
    experts, out, cols = rows.shape
    blocks = rows.reshape(experts, out, cols // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True).clamp_min(2.0 ** -120)
    exponent = torch.ceil(torch.log2(amax / 6.0)).to(torch.int32)
    scaled = blocks / torch.exp2(exponent.float())
    distance = (scaled.abs().unsqueeze(-1) - E2M1).abs()
    nearest = distance.min(-1, keepdim=True).values
    ties = distance == nearest
    codes = torch.where(ties.sum(-1) > 1, (ties & (torch.arange(8) % 2 == 0)).int().argmax(-1), ties.int().argmax(-1))
    codes = (codes | torch.where(scaled < 0, 8, 0)).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), (exponent.squeeze(-1) + 127).to(torch.uint8)


def tiny_gpt_oss():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt_oss", **DIMS)).eval()


def write_mxfp4_base(plain, path) -> None:
    """A bf16 gpt_oss saved by transformers (in `plain`), its experts then stored as MXFP4 the way
    the gpt-oss checkpoints are (blocks and scales beside the bf16 biases) in `path`."""
    tiny_gpt_oss().to(torch.bfloat16).save_pretrained(str(plain))
    path.mkdir()
    (path / "config.json").write_text((plain / "config.json").read_text())
    tensors = load_file(str(plain / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(tuple(EXPERTS))]:
        tensors[name + "_blocks"], tensors[name + "_scales"] = quantize(tensors.pop(name))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = QUANTIZATION
    (path / "config.json").write_text(json.dumps(config))


def load(path, dtype):
    """transformers' own load: on a CPU it dequantizes MXFP4 experts (Mxfp4Dequantize)."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def make_adapter(base, path, target_parameters=EXPERTS):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], target_parameters=list(target_parameters))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load(base, torch.float32), config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(str(path))


def peft_model(base, adapter, dtype):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(load(base, dtype), str(adapter)).eval()


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp4")
    write_mxfp4_base(root / "plain", root / "base")
    make_adapter(root / "base", root / "fused")
    make_adapter(root / "base", root / "attention", target_parameters=())
    return root


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_is_transformers_for_every_code_and_scale(dtype):
    """Every byte under every scale (0..255, the ends overflowing float32 to inf), and a shape
    with several experts and blocks per row for the transposition."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    every = (np.tile(np.arange(256, dtype=np.uint8), (256, 1)).reshape(1, 256, 16, 16),
             np.repeat(np.arange(256, dtype=np.uint8), 16).reshape(1, 256, 16))
    gen = np.random.default_rng(0)
    mixed = (gen.integers(0, 256, (3, 40, 2, 16), dtype=np.uint8), gen.integers(100, 140, (3, 40, 2), dtype=np.uint8))
    for blocks, scales in (every, mixed):
        ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=dtype)
        experts, rows, groups, _ = blocks.shape
        ours = dequant_mxfp4.dequantize(blocks.reshape(-1), scales, (experts, groups * 32, rows))
        assert ref.shape == ours.shape
        widened = torch.from_numpy(ours.astype(np.int32) << 16).view(torch.float32)
        assert torch.equal(widened.to(dtype).view(torch.uint8), ref.contiguous().view(torch.uint8))  # bit for bit


def test_rows_are_the_whole_decode_expert_by_expert():
    """What the merge reads (Mxfp4Rows: one expert decoded at a time) is the whole weight's decode,
    whatever the row blocks: blocks crossing experts, one row, the whole view; the one-pass
    kernel's sums are the widened values plus ΔW rounded once."""
    from loratools.ops import fused
    from loratools.ops.rounding import BF16_OVERFLOW, round_to_bf16

    gen = np.random.default_rng(3)
    blocks, scales = gen.integers(0, 256, (3, 40, 2, 16), dtype=np.uint8), gen.integers(100, 140, (3, 40, 2), dtype=np.uint8)
    shape = (3, 64, 40)
    whole = dequant_mxfp4.dequantize(blocks.reshape(-1), scales, shape).reshape(3 * 64, 40)
    rows = dequant_mxfp4.Mxfp4Rows(blocks.reshape(-1), scales, shape)
    assert rows.shape == whole.shape
    widened = (whole.astype(np.uint32) << 16).view(np.float32)
    delta = (gen.standard_normal(whole.shape) * 0.01).astype(np.float32)
    for start, stop in [(0, 192), (60, 70), (63, 129), (5, 6), (128, 192)]:
        block = np.empty((stop - start, 40), dtype=np.float32)
        rows.fill(start, stop, block, None)
        assert np.array_equal(block.view(np.uint32), widened[start:stop].view(np.uint32)), (start, stop)
        out, want = np.empty((stop - start, 40), dtype=np.uint16), np.empty((stop - start, 40), dtype=np.uint16)
        assert rows.add_rounded(start, stop, delta[start:stop], out, BF16_OVERFLOW)
        round_to_bf16(widened[start:stop] + delta[start:stop], want, np.empty(want.shape, dtype=np.uint32))
        assert np.array_equal(out, want)
    assert rows.one_pass and fused.native is not None


def test_test_quantizer_keeps_the_weights_close():
    """The test base is a fair MXFP4 checkpoint: within half a code step of the weights."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    weight = torch.randn(2, 64, 48, generator=torch.Generator().manual_seed(0))
    blocks, scales = quantize(weight)
    decoded = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, -1).transpose(1, 2)  # the largest step of each block
    assert ((decoded - weight).abs() <= step).all()
    assert (decoded != 0).float().mean() > 0.5


def test_info_describes_an_mxfp4_base(mxfp4):
    result = run_cli("info", mxfp4 / "fused", "--base", mxfp4 / "base", "--json")
    assert result.returncode == 0, result.stderr
    base = json.loads(result.stdout)["base"]
    assert base["quantization"] == "mxfp4 e2m1, 32-value blocks with power-of-two scales"
    assert base["quantized_weights"] == 4  # two parameters in each of two layers
    plain = len(tiny_gpt_oss().state_dict())
    assert base["tensors"] == plain  # the experts counted once each, not as blocks and scales
    text = run_cli("info", mxfp4 / "fused", "--base", mxfp4 / "base")
    assert "quantized base (mxfp4 e2m1, 32-value blocks with power-of-two scales), 4 quantized weights" in text.stdout
    checked = run_cli("validate", mxfp4 / "fused", "--base", mxfp4 / "base")  # each expert's slice against its shape
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "quantized base (mxfp4" in checked.stdout


@pytest.mark.parametrize("adapter", ["fused", "attention"])
def test_merge_is_transformers_dequantization_plus_peft_delta(mxfp4, tmp_path, adapter):
    """bf16 OUT: untouched experts exactly transformers' dequantization; adapted ones that plus
    PEFT's ΔW (PEFT's float32 merge on transformers' float32 dequantization), rounded once. The
    tensors, dtypes and shapes are those of a plain bf16 gpt_oss as transformers saves it."""
    result = run_cli("merge", mxfp4 / "base", mxfp4 / adapter, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "quantized base (mxfp4" in result.stdout and "dequantized" in result.stdout
    ours = merged_tensors(tmp_path / "out")
    dequantized = load(mxfp4 / "base", torch.bfloat16).state_dict()
    peft32 = peft_model(mxfp4 / "base", mxfp4 / adapter, torch.float32).merge_and_unload().state_dict()
    plain = merged_tensors(mxfp4 / "plain")
    assert {k: (v.dtype, v.shape) for k, v in ours.items()} == {k: (v.dtype, v.shape) for k, v in plain.items()}
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    experts = [k for k in ours if k.endswith(tuple(EXPERTS))]
    assert len(experts) == 4
    for name in experts:
        if adapter == "attention":
            assert np.array_equal(_bits(ours[name]), _bits(dequantized[name])), name  # bit for bit
        else:
            expected = peft32[name].to(torch.bfloat16)  # rounded once (from PEFT's float32 sum)
            assert not torch.equal(expected, dequantized[name])
            # at most one bf16 step apart, and only where the float32 sums (ΔW summed in another
            # order) fall on either side of a rounding midpoint
            torch.testing.assert_close(ours[name].float(), expected.float(), rtol=2**-7, atol=2**-20, msg=name)
            assert (ours[name] == expected).float().mean() > 0.999, name


def test_merged_float32_model_has_the_peft_models_logits(mxfp4, tmp_path):
    """--dtype float32: OUT loads in transformers as a plain gpt_oss and computes what the PEFT
    model on transformers' dequantized base computes."""
    result = run_cli("merge", mxfp4 / "base", mxfp4 / "fused", tmp_path / "out", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    ours = merged_tensors(tmp_path / "out")
    peft = peft_model(mxfp4 / "base", mxfp4 / "fused", torch.float32)
    expected = logits(peft)
    merged = peft.merge_and_unload().state_dict()
    for name in [k for k in ours if k.endswith(tuple(EXPERTS))]:
        torch.testing.assert_close(ours[name], merged[name], rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(logits(load(tmp_path / "out", torch.float32)), expected, rtol=1e-4, atol=1e-5)


def test_dry_run_plans_the_experts_from_their_blocks(mxfp4):
    plan = json.loads(run_cli("merge", mxfp4 / "base", mxfp4 / "fused", mxfp4 / "x", "--dry-run", "--json").stdout)
    outs = {t["name"]: t for tensors in plan["shards"].values() for t in tensors}
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert outs[name]["source"] == name + "_blocks" and outs[name]["action"] == "merge" and outs[name]["quantized"] == name
    assert outs[name]["shape"] == [4, 64, 64] and outs[name]["dtype"] == "BF16"
    assert not any(n.endswith(("_blocks", "_scales")) for n in outs)
    down = outs["model.layers.0.mlp.experts.down_proj"]
    assert down["shape"] == [4, 32, 64]


def _rewrite(base, tmp_path, change):
    out = tmp_path / "broken"
    out.mkdir()
    tensors = load_file(str(base / "model.safetensors"))
    config = json.loads((base / "config.json").read_text())
    change(tensors, config)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


SCALES = "model.layers.0.mlp.experts.down_proj_scales"


@pytest.mark.parametrize("change, message", [
    (lambda t, c: t.pop(SCALES), "without model.layers.0.mlp.experts.down_proj_scales"),
    (lambda t, c: t.__setitem__(SCALES, t[SCALES][:, :, :0]), "MXFP4 experts need U8"),
    (lambda t, c: t.__setitem__(SCALES, t[SCALES].float()), "MXFP4 experts need U8"),
    (lambda t, c: c["quantization_config"].__setitem__("quant_method", "fp8"), "quant_method is 'fp8'"),
    (lambda t, c: t.__setitem__("model.layers.0.mlp.experts.down_proj", torch.zeros(4, 32, 64)), "beside its MXFP4 blocks"),
])
def test_broken_mxfp4_base_is_a_clean_error(mxfp4, tmp_path, change, message):
    broken = _rewrite(mxfp4 / "base", tmp_path, change)
    result = run_cli("merge", broken, mxfp4 / "fused", tmp_path / "out")
    assert_clean_error(result, message)
    assert not (tmp_path / "out").exists()
    checked = run_cli("validate", mxfp4 / "fused", "--base", broken, "--json")
    assert checked.returncode != 0 and "Traceback" not in checked.stderr and message in checked.stdout + checked.stderr
    with pytest.raises(LoraToolsError) as raised:
        open_checkpoint(broken)
    assert raised.value.code == "quant-state"


def test_transformers_saves_dequantized_experts_under_the_blocks_names(mxfp4, tmp_path):
    """Why OUT is not "what transformers' save_pretrained writes" here: transformers 5.23 saves an
    MXFP4 model it dequantized with the bf16 experts under the `_blocks` names and no
    quantization_config, which it then loads with the experts missing (newly initialised).
    OUT holds them under the parameter's own name, as a bf16 gpt_oss is saved. If this fails,
    transformers changed and OUT's layout should be held against its save again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load(mxfp4 / "base", torch.bfloat16).save_pretrained(str(tmp_path / "saved"))
    saved = merged_tensors(tmp_path / "saved")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert name not in saved and saved[name + "_blocks"].dtype == torch.bfloat16
    assert saved[name + "_blocks"].shape == (4, 64, 64) and name + "_scales" not in saved


def test_scales_in_another_shard(mxfp4, tmp_path):
    """Blocks and scales are found by name across shards: the same OUT as from one file."""
    tensors = load_file(str(mxfp4 / "base" / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((mxfp4 / "base" / "config.json").read_text())
    second = {k for k in tensors if k.endswith("_scales") or ".layers.1." in k and k.endswith("_blocks")}
    files = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if k not in second},
             "model-00002-of-00002.safetensors": {k: tensors[k] for k in second}}
    for file, part in files.items():
        save_file(part, str(sharded / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: file for file, part in files.items() for k in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    for base, out in ((mxfp4 / "base", tmp_path / "one"), (sharded, tmp_path / "two")):
        result = run_cli("merge", base, mxfp4 / "fused", out)
        assert result.returncode == 0, result.stderr
    one, two = merged_tensors(tmp_path / "one"), merged_tensors(tmp_path / "two")
    assert set(one) == set(two) and all(torch.equal(one[k], two[k]) for k in one)
    written = json.loads((tmp_path / "two" / "model.safetensors.index.json").read_text())["weight_map"]
    assert written["model.layers.1.mlp.experts.gate_up_proj"] == "model-00002-of-00002.safetensors"
