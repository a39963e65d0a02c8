"""The one-pass bfloat16 kernel (C extension, ops/fused.py) against the definition, bit for bit.

Each of its three functions must give the bits of the numpy path it replaces: the float32 sum of
the widened (or decoded) base and ΔW, rounded to nearest bfloat16 with ties to even on the
bits, and the same verdict on finiteness. The 4-bit lookup has an AVX-512, an AVX2 and a scalar
form; every form this CPU has is run (set_level caps it), so no result depends on which one a
machine picks. Whole merges with the extension and without (LORATOOLS_NO_C) write the same bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loratools.ops import dequant, fused
from loratools.ops.rounding import BF16_OVERFLOW, widen_bf16

from .test_dequant_rows import definition as decoded_4bit
from .test_rounding import edge_bits, random_bits, reference_finite, reference_round

ROOT = Path(__file__).resolve().parents[1]
LORATOOLS = [sys.executable, "-m", "loratools"]
native = fused.native


def test_the_extension_is_built():
    # ./dev installs with a C compiler: the tests must run the C kernel, not only the fallback
    assert native is not None, "loratools.ops._fused was not built (is gcc installed?)"


def widened(bits16: np.ndarray) -> np.ndarray:
    out = np.empty(bits16.shape, dtype=np.float32)
    widen_bf16(bits16, out)
    return out


def expected(sums: np.ndarray) -> tuple[np.ndarray, bool]:
    bits = sums.view(np.uint32)
    return reference_round(bits), reference_finite(bits)


def pairs(n: int = 1 << 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """bfloat16 bases and float32 deltas: random, and every pair of edge values (ties, the
    largest finite, sums that round to Inf, ±0, ±Inf, NaNs)."""
    rng = np.random.default_rng(seed)
    edges = edge_bits()
    base_edges = np.repeat(edges >> 16, edges.size).astype(np.uint16)
    delta_edges = np.tile(edges, edges.size).view(np.float32)
    base = (random_bits(n) >> 16).astype(np.uint16)
    delta = (rng.standard_normal(n) * 0.01).astype(np.float32)
    return np.concatenate([base_edges, base]), np.concatenate([delta_edges, delta])


def test_add_bf16_is_widen_add_round():
    base, delta = pairs()
    with np.errstate(all="ignore"):
        sums = widened(base) + delta
    want, finite = expected(sums)
    out = np.empty(base.size, dtype=np.uint16)
    assert native.add_bf16(base, delta, out, BF16_OVERFLOW) is finite
    assert np.array_equal(out, want)
    # a finite part alone: the flag is True and the bits still the definition's
    ok = np.abs(sums) < BF16_OVERFLOW
    out = np.empty(int(ok.sum()), dtype=np.uint16)
    assert native.add_bf16(np.ascontiguousarray(base[ok]), np.ascontiguousarray(delta[ok]), out, BF16_OVERFLOW) is True
    assert np.array_equal(out, want[ok])


def test_add_bf16_without_delta_copies_and_checks():
    base = (random_bits(1 << 12) >> 16).astype(np.uint16)
    out = np.empty_like(base)
    assert native.add_bf16(base, None, out, BF16_OVERFLOW) is reference_finite(widened(base).view(np.uint32))
    assert np.array_equal(out, base)
    finite = base[(base & 0x7F80) != 0x7F80]
    out = np.empty_like(finite)
    assert native.add_bf16(finite, None, out, BF16_OVERFLOW) is True
    assert np.array_equal(out, finite)


@pytest.mark.parametrize("round_base", [False, True])
def test_add_f32_is_add_round(round_base):
    base16, delta = pairs(seed=1)
    rng = np.random.default_rng(2)
    base = widened(base16)
    base[-(1 << 15):] += rng.standard_normal(1 << 15).astype(np.float32) * 1e-3  # not bf16 values
    held = widened(reference_round(base.view(np.uint32))) if round_base else base
    with np.errstate(all="ignore"):  # Inf and NaN sums are part of the case
        want, finite = expected(held + delta)
    out = np.empty(base.size, dtype=np.uint16)
    assert native.add_f32(base, delta, out, BF16_OVERFLOW, round_base) is finite
    assert np.array_equal(out, want)


def _4bit_case(numel: int, blocksize: int, seed: int, scale: float = 3.0, fp4: bool = False):
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, size=(numel + 1) // 2, dtype=np.uint8)
    absmax = rng.uniform(0.01, scale, size=-(-numel // blocksize)).astype(np.float32)
    code = np.sort(rng.uniform(-1, 1, size=16)).astype(np.float32)
    if fp4:
        code[8] = -0.0
    delta = (rng.standard_normal(numel) * 0.05).astype(np.float32)
    return packed, absmax, code, delta


def _4bit_expected(packed, absmax, code, blocksize, delta, first, n, round_base):
    values = decoded_4bit(packed, absmax, code, blocksize, first + n)[first:]
    if round_base:
        values = widened(reference_round(values.view(np.uint32)))
    return expected(values + delta[first: first + n] if delta is not None else values)


@pytest.fixture(params=[2, 1, 0], ids=["avx512", "avx2", "scalar"])
def level(request):
    """Each form of the 4-bit lookup (a form the CPU lacks falls back to the next one down)."""
    previous = native.set_level(request.param)
    yield request.param
    native.set_level(previous)


@pytest.mark.parametrize("round_base", [True, False], ids=["bf16-state", "f32-state"])
@pytest.mark.parametrize("blocksize", [64, 128, 4096])
@pytest.mark.parametrize("first", [0, 1, 15, 63, 64, 129])
def test_add_4bit_is_decode_add_round(level, blocksize, first, round_base):
    numel = 3 * blocksize + 37
    packed, absmax, code, delta = _4bit_case(numel, blocksize, seed=blocksize + first)
    n = numel - first - 5  # ends mid-block and off any vector width
    want, finite = _4bit_expected(packed, absmax, code, blocksize, delta, first, n, round_base)
    out = np.empty(n, dtype=np.uint16)
    assert native.add_4bit(packed, first, code, absmax, blocksize, delta[first: first + n], out, BF16_OVERFLOW, round_base) is finite
    assert np.array_equal(out, want)
    assert finite


def test_add_4bit_overflow_and_fp4_negative_zero(level):
    packed, absmax, code, delta = _4bit_case(1000, 64, seed=5, fp4=True)
    code[-1], absmax[3] = 1.0, 3.4e38  # this block's largest code rounds to Inf in bfloat16
    for round_base in (True, False):
        want, finite = _4bit_expected(packed, absmax, code, 64, None, 0, 1000, round_base)
        out = np.empty(1000, dtype=np.uint16)
        assert native.add_4bit(packed, 0, code, absmax, 64, None, out, BF16_OVERFLOW, round_base) is finite is False
        assert np.array_equal(out, want)
    assert (want == 0x8000).any()  # fp4's code 8 kept its sign


@given(st.integers(0, 300), st.integers(0, 300), st.sampled_from([32, 64, 256]), st.booleans(), st.integers(0, 2))
def test_add_4bit_any_span(first, n, blocksize, round_base, form):
    """Any span of a weight, in any form: the bits of the definition."""
    previous = native.set_level(form)
    try:
        numel = first + n + 3
        packed, absmax, code, delta = _4bit_case(numel, blocksize, seed=numel)
        want, finite = _4bit_expected(packed, absmax, code, blocksize, delta, first, n, round_base)
        out = np.empty(n, dtype=np.uint16)
        got = native.add_4bit(packed, first, code, absmax, blocksize, delta[first: first + n], out, BF16_OVERFLOW, round_base)
        assert got is finite and np.array_equal(out, want)
    finally:
        native.set_level(previous)


def test_the_4bit_row_source_uses_the_kernel():
    packed, absmax, code, delta = _4bit_case(40 * 96, 64, seed=9)
    rows = dequant.BnbRows(packed, absmax, code, 64, (40, 96), "BF16")
    assert rows.one_pass
    want, _ = _4bit_expected(packed, absmax, code, 64, delta, 96 * 7, 96 * 20, True)
    out = np.empty(96 * 20, dtype=np.uint16)
    assert rows.add_rounded(7, 27, delta[96 * 7: 96 * 27], out, BF16_OVERFLOW)
    assert np.array_equal(out, want)


def test_bad_buffers_are_refused():
    out = np.empty(8, dtype=np.uint16)
    with pytest.raises(ValueError):
        native.add_bf16(np.zeros(4, dtype=np.uint16), None, out, BF16_OVERFLOW)
    with pytest.raises(ValueError):
        native.add_bf16(np.zeros(8, dtype=np.uint16), np.zeros(4, dtype=np.float32), out, BF16_OVERFLOW)
    with pytest.raises(ValueError):
        native.add_4bit(np.zeros(3, dtype=np.uint8), 0, np.zeros(16, dtype=np.float32), np.ones(1, dtype=np.float32), 64, None, out,
                        BF16_OVERFLOW, True)  # 6 elements packed, 8 asked for
    with pytest.raises(ValueError):
        native.add_4bit(np.zeros(8, dtype=np.uint8), 0, np.zeros(16, dtype=np.float32), np.ones(1, dtype=np.float32), 4, None, out,
                        BF16_OVERFLOW, True)  # 2 blocks of 4 needed, 1 scale
    with pytest.raises(ValueError):
        native.add_4bit(np.zeros(4, dtype=np.uint8), 0, np.zeros(8, dtype=np.float32), np.ones(1, dtype=np.float32), 64, None,
                        out, BF16_OVERFLOW, True)  # a 4-bit code has 16 values
    with pytest.raises(TypeError):
        native.add_bf16(np.zeros(8, dtype=np.uint16), None, np.zeros(8, dtype=np.uint16)[::2], BF16_OVERFLOW)


# ---- whole merges: with the extension and without, the same bytes ----------------------------

def _merge(base: Path, adapter: Path, out: Path, *args: str, without_c: bool = False) -> dict[str, bytes]:
    env = dict(os.environ)
    env.pop("LORATOOLS_NO_C", None)
    if without_c:
        env["LORATOOLS_NO_C"] = "1"
    proc = subprocess.run([*LORATOOLS, "merge", str(base), str(adapter), str(out), "--quiet", *args], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _same_bytes(base: Path, adapter: Path, tmp_path: Path, *args: str) -> None:
    with_c = _merge(base, adapter, tmp_path / "c", *args)
    numpy_only = _merge(base, adapter, tmp_path / "numpy", *args, without_c=True)
    assert with_c.keys() == numpy_only.keys()
    for name in with_c:
        assert with_c[name] == numpy_only[name], name


@pytest.mark.parametrize("adapter", ["llama-basic", "llama-embedding", "llama-rslora-patterns"])
def test_float32_base_into_bfloat16_same_bytes(adapter, tmp_path):
    _same_bytes(ROOT / "fixtures/bases/llama", ROOT / "fixtures/adapters" / adapter, tmp_path, "--dtype", "bfloat16")


def test_bfloat16_base_same_bytes(tmp_path):
    from peft import LoraConfig, get_peft_model

    from .quantized_models import ADAPTED, save_bf16, tiny_causal_lm

    base = save_bf16("llama", tmp_path / "base")
    model = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=ADAPTED, init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    _same_bytes(base, tmp_path / "adapter", tmp_path)


def test_nf4_base_same_bytes(tmp_path):
    from .quantized_models import qlora_adapter, save_bf16, save_bnb4

    base4 = save_bnb4(save_bf16("llama", tmp_path / "base16"), tmp_path / "base4")
    _same_bytes(base4, qlora_adapter(base4, tmp_path / "adapter"), tmp_path)
