"""LoRA on convolutions (diffusers' UNet style): PEFT's _ConvNd saves lora_A as a kxk convolution
to r channels (r, in, *kernel) and lora_B as a 1x1 one (out, r, 1, …), and merges
ΔW = s·B⊛A. loratools merges it as the (out, in·Πkernel) matrix s·B·A of the factors' matrix
views. Each adapter here is made by real PEFT on a tiny seeded module with UNet-like names (no
family loratools knows, no config.json: modules are found by their exact path) and compared with
PEFT's merge_and_unload and with the PEFT model's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import assert_clean_error, run_cli
from tests.merged import assert_matches_peft, merged_tensors

TARGETS = ["conv_in", "conv1", "conv2", "conv_shortcut", "proj_in", "time_emb_proj"]


class Resnet(torch.nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = torch.nn.Linear(6, cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = torch.nn.Conv2d(cin, cout, 1)

    def forward(self, x, t):
        h = self.conv1(x) + self.time_emb_proj(t)[:, :, None, None]
        return self.conv2(torch.nn.functional.silu(h)) + self.conv_shortcut(x)


class Attention(torch.nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.proj_in = torch.nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.proj_in(x)


class DownBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.resnets = torch.nn.ModuleList([Resnet(8, 12)])
        self.attentions = torch.nn.ModuleList([Attention(12)])

    def forward(self, x, t):
        return self.attentions[0](self.resnets[0](x, t))


class TinyUNet(torch.nn.Module):
    """down_blocks.0.resnets.0.conv1 (3x3), .conv_shortcut (1x1), .time_emb_proj (Linear), ..."""

    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.down_blocks = torch.nn.ModuleList([DownBlock()])
        self.conv_out = torch.nn.Conv2d(12, 4, 3, padding=1)

    def forward(self, x, t):
        return self.conv_out(self.down_blocks[0](self.conv_in(x), t))


def unet(dtype=torch.float32):
    torch.manual_seed(0)
    return TinyUNet().to(dtype).eval()


@torch.no_grad()
def unet_outputs(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(42)
    x, t = torch.randn(2, 4, 5, 6, generator=gen), torch.randn(2, 6, generator=gen)
    dtype = next(model.parameters()).dtype
    return model(x.to(dtype), t.to(dtype)).float()


def randomised(model, seed: int = 1):
    """Trained-looking factors: every LoRA parameter (B too, which PEFT starts at 0) moved."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.3)
    return model


def make(tmp_path, build, dtype=torch.float32, **lora):
    """base/model.safetensors (a bare state_dict), adapter/ by PEFT; returns the dirs, the base
    tensors and the PEFT model (unmerged)."""
    from peft import LoraConfig, get_peft_model

    model = build(dtype)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    peft = randomised(get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora})))
    peft.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "base", tmp_path / "adapter", base, peft.eval()


def merged_model(build, tensors: dict, dtype=torch.float32):
    model = build(dtype)
    model.load_state_dict(tensors)
    return model.eval()


@pytest.mark.parametrize("lora", [{}, {"use_dora": True}, {"lora_bias": True}, {"use_rslora": True, "r": 3}],
                         ids=["lora", "dora", "lora_bias", "rslora"])
def test_conv_lora_merges_as_peft(tmp_path, lora):
    """1x1 and 3x3 kernels and a Linear in one adapter: OUT equals PEFT's merge_and_unload to
    float32 round-off, and the module loaded with OUT computes what the unmerged PEFT model does."""
    base_dir, adapter_dir, base, peft = make(tmp_path, unet, **lora)
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    conv1 = "base_model.model.down_blocks.0.resnets.0.conv1"
    assert saved[f"{conv1}.lora_A.weight"].shape[2:] == (3, 3) and saved[f"{conv1}.lora_B.weight"].shape[2:] == (1, 1)
    expected = unet_outputs(peft)

    result = run_cli("merge", base_dir, adapter_dir, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    ours = merged_tensors(tmp_path / "out")
    assert set(ours) == set(base)
    reference = peft.merge_and_unload().state_dict()
    assert_matches_peft(ours, reference)
    changed = {k for k in ours if not torch.equal(ours[k], base[k])}
    weights = {"conv_in.weight"} | {f"down_blocks.0.resnets.0.{m}.weight" for m in ("conv1", "conv2", "conv_shortcut", "time_emb_proj")}
    weights |= {"down_blocks.0.attentions.0.proj_in.weight"}
    biases = {w.replace(".weight", ".bias") for w in weights} if lora.get("lora_bias") else set()
    assert changed == weights | biases
    assert all((ours[k] - base[k]).abs().max() > 1e-3 for k in weights)
    torch.testing.assert_close(unet_outputs(merged_model(unet, ours)), expected, rtol=1e-4, atol=1e-5)

    assert run_cli("validate", adapter_dir, "--base", base_dir).returncode == 0
    info = json.loads(run_cli("info", adapter_dir, "--json").stdout)
    shapes = {m["name"]: m["weight_shape"] for m in info["modules"]}
    assert shapes["down_blocks.0.resnets.0.conv1"] == [12, 8, 3, 3]
    assert shapes["down_blocks.0.resnets.0.conv_shortcut"] == [12, 8, 1, 1]
    assert shapes["down_blocks.0.resnets.0.time_emb_proj"] == [12, 6]
    assert info["refusals"]["merge"] == [] and "convolution's LoRA" in info["refusals"]["rewrite"][0]


def test_bf16_base_is_rounded_once(tmp_path):
    """A bf16 UNet (PEFT keeps its LoRA factors in float32): W + ΔW computed in float32 and rounded
    once into bfloat16 — within half a bf16 step of the exact sum, where rounding ΔW first would not be."""
    base_dir, adapter_dir, base, peft = make(tmp_path, unet, torch.bfloat16)
    result = run_cli("merge", base_dir, adapter_dir, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    ours = merged_tensors(tmp_path / "out")
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for name in ("conv_in", "down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv_shortcut"):
        a, b = (saved[f"base_model.model.{name}.lora_{p}.weight"].double() for p in "AB")
        delta = 2.0 * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)  # PEFT's B⊛A, exactly (float64)
        exact = base[f"{name}.weight"].double() + delta
        got = ours[f"{name}.weight"]
        assert got.dtype == torch.bfloat16 and delta.abs().max() > 1e-2
        # one rounding: within 2^-8 relative (plus float32 arithmetic); two could miss by a whole step
        assert ((got.double() - exact).abs() <= 2.0**-8 * exact.abs() * (1 + 1e-5) + 1e-6).all(), name
    assert_matches_peft(ours, peft.merge_and_unload().state_dict(), base)
    torch.testing.assert_close(unet_outputs(merged_model(unet, ours, torch.bfloat16)), unet_outputs(peft.merge_and_unload()),
                               rtol=0.05, atol=0.05)


def test_svd_of_a_conv_module_is_the_spectrum_of_its_weight_matrix(tmp_path):
    """svd analyses ΔW as the (out, in·kh·kw) matrix: PEFT's B⊛A reshaped is B·reshape(A), so
    its singular values are those of the factors' product."""
    base_dir, adapter_dir, base, peft = make(tmp_path, unet)
    report = json.loads(run_cli("svd", adapter_dir, "--json").stdout)
    merged = peft.merge_and_unload().state_dict()
    for module in report["modules"]:
        delta = (merged[module["name"] + ".weight"] - base[module["name"] + ".weight"]).double()
        assert list(delta.shape) == module["shape"]
        sigma = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))[: module["rank"]]
        torch.testing.assert_close(torch.tensor(module["singular_values"], dtype=torch.float64), sigma, rtol=1e-4, atol=1e-6)


def test_rewriting_commands_refuse_conv_modules(tmp_path):
    """convert, combine and resize write 2-D factors: a convolution's LoRA is refused, in one line."""
    _, adapter_dir, _, _ = make(tmp_path, unet)
    for args in (("convert", adapter_dir, tmp_path / "c"), ("resize", adapter_dir, tmp_path / "r", "--rank", "2"),
                 ("combine", adapter_dir, adapter_dir, "--out", tmp_path / "m")):
        assert_clean_error(run_cli(*args), "is a convolution's LoRA", f"which {args[0]} cannot write", code=1)
    assert not any((tmp_path / n).exists() for n in "crm")


def test_conv_merge_overflow_is_refused_by_validate_as_by_merge(tmp_path):
    """The finiteness bound |ΔW_ij| ≤ |s|·‖B_i‖·‖A_:,j‖ holds for the matrix view in any summation
    order (PEFT's conv too): a ΔW beyond float32 is refused before writing, by merge and validate --base alike."""
    base_dir, adapter_dir, _, _ = make(tmp_path, unet)
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    module = "base_model.model.down_blocks.0.resnets.0.conv2"
    tensors[f"{module}.lora_B.weight"] = tensors[f"{module}.lora_B.weight"] * 1e30  # each factor finite,
    tensors[f"{module}.lora_A.weight"] = tensors[f"{module}.lora_A.weight"] * 1e10  # ΔW ~1e39
    save_file(tensors, str(weights), metadata={"format": "pt"})
    merged = run_cli("merge", base_dir, adapter_dir, tmp_path / "out")
    assert_clean_error(merged, "merged down_blocks.0.resnets.0.conv2.weight is not finite in float32", code=1)
    assert not (tmp_path / "out").exists()
    findings = json.loads(run_cli("validate", adapter_dir, "--base", base_dir, "--json").stdout)["results"][0]["findings"]
    assert [f["code"] for f in findings] == ["merge-overflow"]
    assert findings[0]["message"] in merged.stderr


# ---- groups > 1: no merged weight of the base's shape, and PEFT refuses it too ---------------------


class Grouped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.proj = torch.nn.Conv2d(6, 6, 1)


def test_grouped_conv_is_refused_with_the_reason(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it cannot merge it
        base_dir, adapter_dir, _, peft = make(tmp_path, lambda dtype: Grouped().to(dtype), target_modules=["conv", "proj"], r=2)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        peft.merge_and_unload()
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert list(saved["base_model.model.conv.lora_A.weight"].shape) == [2, 6, 3, 3]  # every input channel
    assert list(saved["base_model.model.conv.lora_B.weight"].shape) == [6, 1, 1, 1]  # lora_B is grouped
    fragment = "a LoRA on a grouped convolution (groups=2)"
    assert_clean_error(run_cli("merge", base_dir, adapter_dir, tmp_path / "out"), fragment, "PEFT's merge_and_unload refuses it too",
                       code=1)
    assert not (tmp_path / "out").exists()
    findings = json.loads(run_cli("validate", adapter_dir, "--json").stdout)["results"][0]["findings"]
    assert [(f["code"], f["module"]) for f in findings] == [("conv-groups", "conv")]


# ---- Conv1d and Conv3d: the same algebra ------------------------------------------------------------


class Convs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.temporal = torch.nn.Conv1d(4, 6, 3, padding=1)
        self.volume = torch.nn.Conv3d(4, 6, (2, 3, 3))
        self.frames = torch.nn.Conv3d(4, 6, (1, 1, 3))  # PEFT's merge takes its 1x1 shortcut and fails here

    @torch.no_grad()
    def outputs(self):
        gen = torch.Generator().manual_seed(7)
        return (self.temporal(torch.randn(2, 4, 9, generator=gen)), self.volume(torch.randn(2, 4, 3, 5, 5, generator=gen)),
                self.frames(torch.randn(2, 4, 3, 5, 5, generator=gen)))


def test_conv1d_and_conv3d_lora_merge(tmp_path):
    """nn.Conv1d (3-D factors) and nn.Conv3d (5-D) merge as PEFT does. For a Conv3d kernel (1, 1, k)
    PEFT's merge_and_unload fails (its 1x1 test looks at two kernel dimensions only and then
    multiplies 3-D tensors); OUT is then what the PEFT model computes."""
    base_dir, adapter_dir, base, peft = make(tmp_path, lambda dtype: Convs().to(dtype), target_modules=["temporal", "volume", "frames"])
    expected = peft.base_model.model.outputs()
    result = run_cli("merge", base_dir, adapter_dir, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    ours = merged_tensors(tmp_path / "out")
    for got, want in zip(merged_model(lambda dtype: Convs(), ours).outputs(), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for name in ("temporal", "volume", "frames"):
        try:
            delta_weight = peft.base_model.model.get_submodule(name).get_delta_weight("default")
        except RuntimeError:  # frames, in PEFT 0.21.2: the outputs above are the reference
            assert name == "frames"
            continue
        torch.testing.assert_close(ours[f"{name}.weight"], base[f"{name}.weight"] + delta_weight, rtol=1e-6, atol=1e-6)
    assert all((ours[f"{n}.weight"] - base[f"{n}.weight"]).abs().max() > 1e-3 for n in ("temporal", "volume", "frames"))


@pytest.mark.parametrize("b_shape", [(6, 2, 3, 3), (6, 2), (6, 2, 1)], ids=["kxk-lora_B", "2-D-lora_B", "3-D-lora_B"])
def test_factors_that_are_not_a_convolutions_lora(tmp_path, b_shape):
    """A 4-D lora_A needs a lora_B of four dimensions with a 1x1 kernel (PEFT's): anything else is
    `conv-factor`, one line from every command that reads the adapter."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["conv"]}))
    save_file({"base_model.model.conv.lora_A.weight": torch.ones(2, 4, 3, 3), "base_model.model.conv.lora_B.weight": torch.ones(b_shape)},
              str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    findings = json.loads(run_cli("validate", adapter, "--json").stdout)["results"][0]["findings"]
    assert [(f["code"], f["module"]) for f in findings] == [("conv-factor", "conv")]
    assert_clean_error(run_cli("svd", adapter), "are not the factors of a convolution's LoRA", code=1)


CONV_CODES = {"vllm": "vllm-conv", "vllm@0.10.0": "vllm-conv", "sglang": "sglang-conv", "llama.cpp": "llamacpp-conv"}


def test_serving_runtimes_refuse_conv_modules(tmp_path):
    """vLLM, SGLang and llama.cpp have LoRA layers for linear layers and embeddings only (their
    loaders: vLLM's LoRA layer classes, SGLang's get_lora_layer, llama.cpp's 2-D lora_a/lora_b):
    validate --target says so for a convolution's LoRA, as an error with the runtime's code; the
    Linear module beside it is not what it is about."""
    from loratools.ops.validate import validate

    (tmp_path / "unet").mkdir()
    _, adapter_dir, _, _ = make(tmp_path / "unet", unet)
    for target, code in CONV_CODES.items():
        found = [f for f in validate(adapter_dir, target=target).findings if f.code == code]
        assert [(f.severity, f.module) for f in found] == [("error", "conv_in")], target
        assert "cannot serve the convolution LoRA of 5 module(s), e.g. conv_in (an nn.Conv2d, lora_A [4, 4, 3, 3])" in found[0].message
        assert "loratools merge BASE ADAPTER OUT" in found[0].message
        result = run_cli("validate", adapter_dir, "--target", target, "--json")
        assert result.returncode == 1
        assert code in {f["code"] for f in json.loads(result.stdout)["results"][0]["findings"]}

    (tmp_path / "convs").mkdir()
    _, convs_dir, _, _ = make(tmp_path / "convs", lambda dtype: Convs().to(dtype), target_modules=["temporal", "volume"])
    messages = [f.message for f in validate(convs_dir, target="vllm").findings if f.code == "vllm-conv"]
    assert len(messages) == 1 and "of 2 module(s), e.g. temporal (an nn.Conv1d, lora_A [4, " in messages[0], messages

    (tmp_path / "linear").mkdir()
    _, linear_dir, _, _ = make(tmp_path / "linear", unet, target_modules=["time_emb_proj"])
    for target, code in CONV_CODES.items():
        assert code not in {f.code for f in validate(linear_dir, target=target).findings}, target
