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

LoRA on fused MoE experts (PEFT target_parameters, A (r·E, in), B (out, r·E)) is written as
llama.cpp's converter writes per-expert LoRA stacked over experts and its graph applies it
(ggml_mul_mat_id on lora_a then lora_b, llama-graph.cpp build_lora_mm_id):
`blk.N.ffn_{gate,up,down}_exps.weight.lora_a` = (E, r, in), expert e's A_e = A[e·r:(e+1)·r], and
`.lora_b` = (E, out, r), B_e = B[:, e::E] (PEFT's (out, r, E) view); a fused gate_up parameter
is split along its rows into gate and up, in the order the family concatenates them
(arch/experts.py), both with the same A. Families whose experts are stored (E, in, out) with
gate/up interleaved (gpt_oss) are refused (gguf_form.py, `export-unsupported`); a fused
parameter the family does not have, `export-experts`.

llama.cpp scales every module by alpha / r, with r read from the tensor and alpha from the file.
A PEFT adapter may give each module its own scaling (rank_pattern, alpha_pattern, rsLoRA's
alpha/√r): each module's B is multiplied by s_module / (alpha / r), so that llama.cpp's scale
times B'·A equals PEFT's s·B·A; B is left as stored where that factor is exactly 1.
Tensors are written as float32 (exact for bf16/fp16/fp32 adapters), only when finite
(`non-finite`, as every writer), into a temporary sibling whose size is checked before it becomes
OUT (formats/atomic.py).

`--base-arch` is checked against the adapter's own evidence (`base_architecture_conflict`): a
family the adapter records (its model class, or the base's config.json model_type) that llama.cpp
names otherwise, or module names of another scheme (GPT-2's c_attn for qwen2), is refused. LLaMA,
Mistral and Qwen2 name their modules alike, so names alone never refuse one of them for another.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..adapter import Adapter, ExpertModule, LoraModule
from ..arch import ARCHITECTURES, Layout, Role
from ..arch import experts as moe
from ..arch.detect import locate
from ..arch.gguf import GGUF_ARCHS, gguf_arch
from ..errors import ConfigError, ShapeError, UnsupportedError, UsageError
from ..formats.atomic import atomic_file, check_size, refuse_overlap
from ..formats.tensors import refuse_non_finite
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
    # A family GGUF export writes that the adapter's own evidence contradicts is the first thing to
    # say; then what no GGUF LoRA carries (gpt_oss's experts, before "GGUF export knows ...").
    if base_arch in GGUF_ARCHS and (conflict := base_architecture_conflict(adapter, base_arch)):
        raise ConfigError(conflict, code="base-architecture")
    _refuse_unservable(adapter)
    target = gguf_arch(family)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[target.name.upper()], _block_count(adapter))
    alpha = float(adapter.config.lora_alpha)
    report = ExportReport(str(adapter.source), str(out), target.name, alpha, 0, len(adapter.modules),
                          skipped=[e.key for e in adapter.extras if e.kind == "full_embedding"])
    report.modules += len(adapter.experts)
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
    tensors += _expert_tensors(adapter, family, target.name, alpha, report)
    report.tensors = len(tensors)
    refuse_non_finite(tensors, out)  # B' may overflow float32 even where B did not
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
        written = sum(fh.tell() for fh in writer.fout)
        writer.close()
        check_size(tmp, written)
    return report


# What each expert role is in llama.cpp's MoE layer.
_EXPERT_TENSORS = {Role.EXPERT_GATE: "FFN_GATE_EXP", Role.EXPERT_UP: "FFN_UP_EXP", Role.EXPERT_DOWN: "FFN_DOWN_EXP"}


def _expert_tensors(adapter: Adapter, family: str, arch_name: str, alpha: float,
                    report: ExportReport) -> list[tuple[str, np.ndarray]]:
    """lora_a (E, r, in) and lora_b (E, out, r) for every part of every fused-experts module."""
    import gguf

    if not adapter.experts:
        return []
    layout = moe.layout_for(adapter.model_type) or moe.layout_for(family)
    first = next(iter(adapter.experts))
    if layout is None:
        raise UsageError(f"module {first}: LoRA on fused MoE experts is written per the base's expert layout; give --base "
                         "(a directory or repo with the base's config.json) or --base-arch (mixtral, qwen2_moe, qwen3_moe)")
    if layout.transposed or any(not p.parts for p in layout.parameters):
        raise UnsupportedError(f"module {first}: {layout.name} stores its experts fused, (E, in, out) with gate and up "
                               "interleaved; loratools export writes expert LoRA for families llama.cpp stacks per expert "
                               "(mixtral, qwen2_moe, qwen3_moe): merge it into the base instead (loratools merge)",
                               code="export-experts")
    known = set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch_name.upper()]])
    out = []
    for path, expert in sorted(adapter.experts.items(), key=lambda kv: (kv[1].layer or -1, kv[0])):
        leaf = path.rpartition(".")[2]
        fused = next((p for p in layout.parameters if p.name == leaf), None)
        if fused is None or expert.layer is None or expert.out_features % len(fused.parts):
            raise UnsupportedError(f"module {path}: not a fused-experts parameter of {layout.name}", code="export-experts")
        a, b = (adapter.tensors.array(key).astype(np.float32) for key in (expert.a_key, expert.b_key))
        b = _fold_scaling(expert, b, alpha, report)
        n, r = expert.num_experts, expert.rank
        a3 = a.reshape(n, r, a.shape[1])  # expert e: rows e·r…(e+1)·r
        b3 = b.reshape(b.shape[0], r, n).transpose(2, 0, 1)  # expert e: columns e, e+E, …
        step = expert.out_features // len(fused.parts)
        for k, part in enumerate(fused.parts):
            tensor = getattr(gguf.MODEL_TENSOR, _EXPERT_TENSORS[part.role])
            if tensor not in known:
                raise UnsupportedError(f"module {path}: llama.cpp's {arch_name} has no {part.role.value} expert tensor",
                                       code="export-module")
            name = gguf.TENSOR_NAMES[tensor].format(bid=expert.layer) + ".weight"
            out += [(f"{name}.lora_a", np.ascontiguousarray(a3)),
                    (f"{name}.lora_b", np.ascontiguousarray(b3[:, k * step: (k + 1) * step]))]
    return out


def base_architecture_conflict(adapter: Adapter, base_arch: str) -> str | None:
    """Why `--base-arch base_arch` contradicts the adapter's own evidence, or None. Evidence is a
    family the adapter records (family_known: its model class, or the base's model_type) or
    the naming scheme of its modules; llama.cpp's name decides (mistral is exported as llama)."""
    det = adapter.detection
    wanted = GGUF_ARCHS[base_arch].name
    if det.architecture is not None and det.family_known:
        own = GGUF_ARCHS.get(det.architecture)
        if own is None or own.name != wanted:
            return (f"--base-arch {base_arch}: the adapter is {det.architecture} ({_evidence(adapter)}), "
                    f"which llama.cpp does not load as {wanted}; give the base the adapter was trained on")
        return None
    prefixes = {h.prefix for h in ARCHITECTURES[base_arch].heads}
    if not adapter.modules or any(locate(base_arch, prefix, path) for path in adapter.modules for prefix in prefixes):
        return None  # names several families share (LLaMA, Mistral, Qwen2...): no contradiction
    seen = f"its module names are {det.architecture}'s" if det.architecture else det.reason.split(";")[0].split(",")[0]
    return (f"--base-arch {base_arch}: no module of the adapter has a {base_arch} name (e.g. {next(iter(adapter.modules))}); "
            f"{seen}")


def _evidence(adapter: Adapter) -> str:
    if adapter.model_type:
        return f"the base's config.json model_type {adapter.model_type!r}"
    if adapter.config.base_model_class:
        return f"its recorded model class {adapter.config.base_model_class}"
    return "its module names"


def _refuse_unservable(adapter: Adapter) -> None:
    adapter.require_supported("export", merging=True, experts=True)
    blockers = gguf_blockers(adapter)
    if blockers:
        raise UnsupportedError(blockers[0][1], code="export-unsupported")
    if not adapter.modules and not adapter.experts:
        raise ShapeError("the adapter has no LoRA modules: nothing to export")


def _fold_scaling(module: LoraModule | ExpertModule, b: np.ndarray, alpha: float, report: ExportReport) -> np.ndarray:
    """B' with llama.cpp's alpha / r times B'·A equal to PEFT's s·B·A."""
    factor = module.scaling * module.rank / alpha if alpha else module.scaling
    if factor == 1.0:
        return b
    report.rescaled.append(module.path)
    with np.errstate(over="ignore"):  # an overflow is refused by name before writing (refuse_non_finite)
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
    layers = [m.layer for m in (*adapter.modules.values(), *adapter.experts.values()) if m.layer is not None]
    return 1 + max(layers, default=0)
