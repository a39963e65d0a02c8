"""Reading and comparing merged outputs (shared by the merge, convert, extract and output tests)."""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load_file


def merged_tensors(out) -> dict[str, torch.Tensor]:
    tensors = {}
    files = [out] if out.is_file() else sorted(out.glob("*.safetensors"))
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def assert_matches_peft(ours: dict, reference: dict, base: dict | None = None) -> None:
    """Equal to PEFT's merged weights: to float32 round-off for float32 bases; for half-precision
    bases within two roundings of the operands' magnitude, because PEFT rounds ΔW (or the adapter
    weights) to the base dtype before adding, where loratools adds in float32 and rounds once."""
    for name, tensor in ours.items():
        ref = reference[name]
        assert tensor.dtype == ref.dtype, name
        if tensor.dtype == torch.float32:
            torch.testing.assert_close(tensor, ref, rtol=1e-6, atol=1e-6, msg=name)
        else:
            eps = torch.finfo(tensor.dtype).eps
            magnitude = ref.float().abs() + (base[name].float().abs() if base else 0)
            error = (tensor.float() - ref.float()).abs()
            assert (error <= 2 * eps * magnitude + 1e-6).all(), (name, (error / (magnitude + 1e-12)).max())


def digest(root) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path: outputs compared byte for byte."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}
