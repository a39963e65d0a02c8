"""`loratools svd` and `resize`: exact spectra without forming ΔW, checked against dense SVD and PEFT."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import loratools
from loratools.ops.resize import resize_adapter
from loratools.ops.svd import effective_rank, energy_rank, stable_rank, svd_report
from tests.conftest import ADAPTER_BASE, ADAPTERS, assert_clean_error, run_cli
from tests.peft_ref import outputs, peft_model

ANALYSED = ["llama-basic", "llama-rslora-patterns", "llama-dora", "llama-embedding", "gpt2-conv1d", "gpt2-lora-bias", "bert-modules-to-save"]


def dense_delta(adapter, path) -> np.ndarray:
    """ΔW formed the slow way, in float64, in the module's own orientation."""
    module = adapter.modules[path]
    a, b = (t.double().numpy() for t in adapter.factors(path))
    delta = module.scaling * b @ a
    return delta if module.layout.value == "linear" else delta.T


@pytest.mark.parametrize("name", ANALYSED)
def test_singular_values_equal_dense_svd(name):
    adapter = loratools.load_adapter(ADAPTERS / name)
    report = svd_report(adapter)
    assert len(report.modules) == len(adapter.modules)
    for m in report.modules:
        dense = np.linalg.svd(dense_delta(adapter, m["name"]), compute_uv=False)
        expected = np.zeros(m["rank"])
        expected[: min(m["rank"], len(dense))] = dense[: m["rank"]]
        np.testing.assert_allclose(m["singular_values"], expected, rtol=1e-5, atol=1e-9 * expected[0])
        assert m["shape"] == list(dense_delta(adapter, m["name"]).shape)


def test_metrics_follow_their_formulas():
    sigma = [4.0, 2.0, 1.0, 0.0]
    p = np.array([4, 2, 1]) / 7
    assert effective_rank(sigma) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert stable_rank(sigma) == pytest.approx((16 + 4 + 1) / 16)
    # energies 16, 4, 1 of 21: 16/21 = 0.762, 20/21 = 0.952, 21/21 = 1
    assert [energy_rank(sigma, t) for t in (0.5, 0.76, 0.77, 0.9, 0.95, 0.96, 1.0)] == [1, 1, 2, 2, 2, 3, 3]
    assert effective_rank([0.0, 0.0]) == 0 and stable_rank([0.0]) == 0 and energy_rank([0.0, 0.0], 0.9) == 0
    assert effective_rank([1.0] * 5) == pytest.approx(5)


def _known_rank_adapter(tmp_path, true_rank: int, r: int = 8):
    """An adapter whose every module has rank `true_rank` < r (the other directions are zero)."""
    base = loratools.load_adapter(ADAPTERS / "llama-basic")
    gen = torch.Generator().manual_seed(3)
    raw = dict(base.config.raw, r=r, lora_alpha=r)
    tensors = {}
    for path, module in base.modules.items():
        mix = torch.zeros(r, r)
        mix[:true_rank, :true_rank] = torch.randn(true_rank, true_rank, generator=gen)
        tensors[module.a_key] = mix @ torch.randn(r, module.in_features, generator=gen)
        tensors[module.b_key] = torch.randn(module.out_features, r, generator=gen)
    adapter = loratools.Adapter.from_tensors(raw, tensors)
    loratools.save_adapter(adapter, tmp_path / "known")
    return tmp_path / "known"


def test_an_adapter_of_known_rank_reports_it(tmp_path):
    path = _known_rank_adapter(tmp_path, true_rank=3)
    result = run_cli("svd", "--json", path, "--threshold", "0.999999")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for m in report["modules"]:
        assert m["energy_rank"] == {"0.999999": 3}
        assert m["singular_values"][3] < 1e-6 * m["singular_values"][0]
    assert report["summary"]["by_role"]["attn_q"]["energy_rank"]["0.999999"] == 3


def test_json_schema_and_text_report():
    result = run_cli("svd", "--json", ADAPTERS / "gpt2-conv1d")
    report = json.loads(result.stdout)
    assert set(report) == {"schema_version", "adapter", "architecture", "dora", "thresholds", "modules", "summary"}
    assert set(report["modules"][0]) == {"name", "role", "layer", "shape", "rank", "scaling", "dora", "singular_values",
                                         "effective_rank", "stable_rank", "energy_rank", "expert"}
    assert set(report["summary"]) == {"overall", "by_role", "by_layer", "verdict"}
    c_attn = next(m for m in report["modules"] if m["name"] == "transformer.h.0.attn.c_attn")
    assert c_attn["shape"] == [16, 48] and c_attn["role"] == "attn_qkv"  # Conv1D: (in, out)
    assert set(report["summary"]["by_layer"]) == {"0", "1"}
    text = run_cli("svd", ADAPTERS / "gpt2-conv1d").stdout
    assert "by role" in text and "by layer" in text and "of r=4 on average" in text


def test_dora_says_it_analyses_the_lora_part():
    text = run_cli("svd", ADAPTERS / "llama-dora").stdout
    assert "DoRA" in text and "s·B·A" in text
    assert json.loads(run_cli("svd", "--json", ADAPTERS / "llama-dora").stdout)["dora"] is True


def test_plot(tmp_path):
    out = tmp_path / "spectra.png"
    assert run_cli("svd", ADAPTERS / "llama-basic", "--plot", out).returncode == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_clean_error(run_cli("svd", ADAPTERS / "llama-basic", "--plot", out), "already exists")
    assert run_cli("svd", ADAPTERS / "llama-basic", "--plot", out, "--force").returncode == 0


def test_plot_without_matplotlib(tmp_path):
    blocker = tmp_path / "block"
    (blocker / "matplotlib").mkdir(parents=True)
    (blocker / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    result = run_cli("svd", ADAPTERS / "llama-basic", "--plot", tmp_path / "x.png", env={"PYTHONPATH": str(blocker)})
    assert_clean_error(result, "pip install 'loratools[plot]'")
    assert not (tmp_path / "x.png").exists()


def test_bad_threshold_is_a_usage_error():
    assert run_cli("svd", ADAPTERS / "llama-basic", "--threshold", "1.5").returncode == 2


# ---- resize ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-basic", "gpt2-conv1d", "llama-rslora-patterns"])
def test_resize_at_full_rank_is_exact(tmp_path, name):
    out = tmp_path / "out"
    assert run_cli("resize", ADAPTERS / name, out, "--rank", "64").returncode == 0
    original, resized = loratools.load_adapter(ADAPTERS / name), loratools.load_adapter(out)
    for path, module in original.modules.items():
        for x, y in zip(original.factors(path), resized.factors(path)):
            assert torch.equal(x, y)
        assert resized.modules[path].scaling == module.scaling


@pytest.mark.parametrize("name", ["llama-basic", "gpt2-conv1d", "llama-rslora-patterns", "llama-embedding", "bert-modules-to-save"])
def test_resize_equals_dense_truncated_svd_and_peft_loads_it(tmp_path, name):
    out = tmp_path / "out"
    result = run_cli("resize", ADAPTERS / name, out, "--rank", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    original, resized = loratools.load_adapter(ADAPTERS / name), loratools.load_adapter(out)
    for path, module in original.modules.items():
        u, s, vh = np.linalg.svd(dense_delta(original, path), full_matrices=False)
        k = min(2, module.rank)
        truncated = (u[:, :k] * s[:k]) @ vh[:k]
        np.testing.assert_allclose(dense_delta(resized, path), truncated, atol=1e-5 * s[0])
        assert resized.modules[path].rank == k
        entry = next(m for m in report["modules"] if m["name"] == path)
        assert entry["old_rank"] == module.rank and entry["new_rank"] == k
        assert entry["retained_energy"] == pytest.approx((s[:k] ** 2).sum() / (s**2).sum(), rel=1e-6)
    # PEFT loads it with no missing or unexpected key, and runs it.
    model = peft_model(ADAPTER_BASE[name], out)
    assert torch.isfinite(outputs(model, ADAPTER_BASE[name])).all()
    # Extras (modules_to_save, biases, saved embeddings) are carried over unchanged.
    for extra in original.extras:
        assert torch.equal(original.tensor(extra.key), resized.tensor(extra.key))


def test_resize_by_energy(tmp_path):
    path = _known_rank_adapter(tmp_path, true_rank=3)
    out = tmp_path / "out"
    assert run_cli("resize", path, out, "--energy", "0.999999").returncode == 0
    resized = loratools.load_adapter(out)
    assert {m.rank for m in resized.modules.values()} == {3}
    original = loratools.load_adapter(path)
    for p in original.modules:
        np.testing.assert_allclose(dense_delta(resized, p), dense_delta(original, p), atol=1e-4)


def test_resize_keeps_peft_outputs_when_the_rank_is_not_cut(tmp_path):
    path = _known_rank_adapter(tmp_path, true_rank=3)
    out = tmp_path / "out"
    assert run_cli("resize", path, out, "--rank", "3").returncode == 0
    torch.testing.assert_close(outputs(peft_model("llama", out), "llama"), outputs(peft_model("llama", path), "llama"), rtol=1e-4, atol=1e-4)


def test_resize_usage_errors(tmp_path):
    assert run_cli("resize", ADAPTERS / "llama-basic", tmp_path / "o").returncode == 2
    assert run_cli("resize", ADAPTERS / "llama-basic", tmp_path / "o", "--rank", "2", "--energy", "0.9").returncode == 2
    assert_clean_error(run_cli("resize", ADAPTERS / "llama-basic", tmp_path / "o", "--rank", "0"), "--rank", code=2)
    assert_clean_error(run_cli("resize", ADAPTERS / "llama-basic", tmp_path / "o", "--energy", "1.5"), "--energy", code=2)
    assert not (tmp_path / "o").exists()


def test_resize_library_api():
    adapter = loratools.load_adapter(ADAPTERS / "llama-dora")
    resized, modules = resize_adapter(adapter, rank=1)
    assert all(m.new_rank == 1 for m in modules)
    assert all(resized.modules[p].magnitude_key for p in resized.modules)  # DoRA magnitudes kept


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_numpy_read_of_half_precision_factors_equals_torch(tmp_path, dtype):
    """svd reads factors with numpy alone (no torch import): bf16 is widened by a bit shift, which
    must give exactly torch's float32 values, and the spectra must still equal a dense SVD."""
    source = loratools.load_adapter(ADAPTERS / "llama-basic")
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    loratools.save_adapter(loratools.Adapter.from_tensors(source.config.raw, tensors), tmp_path / "half")
    adapter = loratools.load_adapter(tmp_path / "half")
    for path in adapter.modules:
        (a_np, b_np), (a_t, b_t) = adapter.factor_arrays(path), adapter.factors(path)
        assert a_t.dtype == dtype
        np.testing.assert_array_equal(a_np, a_t.float().numpy() if dtype != torch.float64 else a_t.numpy())
        np.testing.assert_array_equal(b_np, b_t.float().numpy() if dtype != torch.float64 else b_t.numpy())
    for m in svd_report(adapter).modules:
        dense = np.linalg.svd(dense_delta(adapter, m["name"]), compute_uv=False)[: m["rank"]]
        np.testing.assert_allclose(m["singular_values"][: len(dense)], dense, rtol=1e-5, atol=1e-9 * dense[0])
