"""`loratools export`: a PEFT LoRA adapter as a GGUF LoRA adapter that llama.cpp loads
(`llama-cli --lora`, `llama-server --lora`, llama-cpp-python's `lora_path`).

The file llama.cpp expects (its convert_lora_to_gguf.py writes the same):
- metadata general.architecture (must match the model's), general.type = "adapter",
  adapter.type = "lora", adapter.lora.alpha (one float for the whole file);
- per adapted weight `<gguf name>.lora_a` = A (r, in) and `.lora_b` = B (out, r), named as the
  model's own tensors (blk.N.attn_q.weight, token_embd.weight, output.weight...);
- token_embd's lora_a transposed to (num_embeddings, r): llama.cpp gathers a row of it per token;
- for the LLaMA family, the rows of q/k's B reordered as llama.cpp's converter reorders the
  base weights (rotary halves interleaved), so that ΔW lands on the same rows as the weight.

llama.cpp scales every module by alpha / r, with r read from the tensor and alpha from the file.
A PEFT adapter may give each module its own scaling (rank_pattern, alpha_pattern, rsLoRA's
alpha/√r): each module's B is multiplied by s_module / (alpha / r), so that llama.cpp's scale
times B'·A equals PEFT's s·B·A; B is left as stored where that factor is exactly 1.
Tensors are written as float32 (exact for bf16/fp16/fp32 adapters).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..adapter import Adapter, LoraModule
from ..arch import Layout, Role
from ..arch.gguf import gguf_arch
from ..errors import ShapeError, UnsupportedError, UsageError
from ..formats.atomic import atomic_file, refuse_overlap
from ..report import Report
from .gguf_form import gguf_blockers


@dataclass
class ExportReport(Report):
    adapter: str
    out: str
    architecture: str  # general.architecture written
    alpha: float  # adapter.lora.alpha written
    tensors: int
    modules: int
    skipped: list[str] = field(default_factory=list)  # saved copies of base embeddings, not exported
    rescaled: list[str] = field(default_factory=list)  # modules whose B carries a folded scaling
    permuted: list[str] = field(default_factory=list)  # modules whose B rows follow llama.cpp's rope order

    def render(self) -> str:
        return (f"exported {self.modules} modules ({self.tensors} tensors) to {self.out}: architecture {self.architecture}, "
                f"alpha {self.alpha:g}; {len(self.rescaled)} with their scaling folded into B, "
                f"{len(self.permuted)} q/k reordered for rope")


def export_gguf(adapter: Adapter, out: str | os.PathLike, base_arch: str | None = None, base_config: dict | None = None,
                force: bool = False) -> ExportReport:
    """Write `out` (a .gguf file) atomically. base_arch: a key of arch.gguf.GGUF_ARCHS (default:
    the adapter's family); base_config: the base's config.json (head counts, tied embeddings)."""
    import gguf

    family = base_arch or adapter.architecture
    if family is None:
        raise UsageError("cannot tell the adapter's architecture; give --base-arch")
    target = gguf_arch(family)
    _refuse_unservable(adapter)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[target.name.upper()], _block_count(adapter))
    alpha = float(adapter.config.lora_alpha)
    report = ExportReport(str(adapter.source), str(out), target.name, alpha, 0, len(adapter.modules),
                          skipped=[e.key for e in adapter.extras if e.kind == "full_embedding"])
    tensors = []
    for path, module in sorted(adapter.modules.items(), key=lambda kv: (kv[1].layer or -1, kv[0])):
        name = names.get_name(path)
        if name is None:
            raise UnsupportedError(f"module {path}: llama.cpp's {target.name} has no tensor for it", code="export-module")
        if module.role is Role.LM_HEAD and (base_config or {}).get("tie_word_embeddings"):
            raise UnsupportedError(f"module {path}: the base ties lm_head to the embedding, and llama.cpp has no separate "
                                   "output tensor to adapt", code="export-module")
        a, b = (x.astype(np.float32) for x in adapter.factor_arrays(path))
        b = _fold_scaling(module, b, alpha, report)
        if target.permute_qk and module.role in (Role.ATTN_Q, Role.ATTN_K):
            b = _rope_rows(b, _heads(module.role, base_config, path))
            report.permuted.append(path)
        if module.layout is Layout.EMBEDDING:
            a = a.T  # (num_embeddings, r): llama.cpp gathers a row per token
        tensors += [(f"{name}.weight.lora_a", np.ascontiguousarray(a)), (f"{name}.weight.lora_b", np.ascontiguousarray(b))]
    report.tensors = len(tensors)
    refuse_overlap(Path(out), adapter.input_paths())
    with atomic_file(out, force=force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), target.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, array in tensors:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return report


def _refuse_unservable(adapter: Adapter) -> None:
    adapter.require_supported("export", merging=True)
    blockers = gguf_blockers(adapter)
    if blockers:
        raise UnsupportedError(blockers[0][1], code="export-unsupported")
    if not adapter.modules:
        raise ShapeError("the adapter has no LoRA modules: nothing to export")


def _fold_scaling(module: LoraModule, b: np.ndarray, alpha: float, report: ExportReport) -> np.ndarray:
    """B' with llama.cpp's alpha / r times B'·A equal to PEFT's s·B·A."""
    factor = module.scaling * module.rank / alpha if alpha else module.scaling
    if factor == 1.0:
        return b
    report.rescaled.append(module.path)
    return b * np.float32(factor)


def _heads(role: Role, config: dict | None, path: str) -> int:
    """Heads whose rotary halves are interleaved: attention heads for q, key/value heads for k."""
    if not config or not isinstance(config.get("num_attention_heads"), int):
        raise UsageError(f"module {path}: the rows of q/k projections are reordered for llama.cpp per attention head; "
                         "give --base (a directory or repo with the base's config.json) for the head counts")
    heads = config["num_attention_heads"]
    if role is Role.ATTN_K:
        heads = config.get("num_key_value_heads") or heads
    return heads


def _rope_rows(b: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered from HF's (first half, second half) to interleaved pairs:
    row (h, half, i) moves to (h, i, half), as llama.cpp's converter does to q/k weights."""
    rows = b.shape[0]
    if rows % (2 * heads):
        raise ShapeError(f"a q/k projection with {rows} rows cannot be split into {heads} heads of rotary pairs")
    return b.reshape(heads, 2, rows // heads // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def _block_count(adapter: Adapter) -> int:
    return 1 + max((m.layer for m in adapter.modules.values() if m.layer is not None), default=0)
