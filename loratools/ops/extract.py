"""`loratools extract`: the inverse of merge — a LoRA adapter approximating FINETUNED − BASE.

Streams both checkpoints tensor by tensor (two tensors and one float32 difference in memory at a
time). For each changed Linear/Conv1D weight (and, as asked, the embedding) the difference D is
approximated by its best rank-k factorisation (Eckart–Young), split evenly into B = U·√S and
A = √S·Vᵀ with scaling 1.

The SVD is randomized (a Gaussian sketch of k + oversampling columns, two power iterations with
re-orthonormalisation): O(m·n·k) instead of the O(m·n·min(m, n)) of a full SVD, a few percent of
its time on 4096×11008. Its approximation is an orthogonal projection of D, so the energy it keeps
is known exactly (Σ kept σ² / ‖D‖²_F), never estimated. A full SVD is used instead where the sketch
would not be smaller than the matrix, where --energy was not reached within --max-rank by the
sketch (the full spectrum then decides), and everywhere with --exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from ..adapter import PREFIX, Adapter, factor_keys
from ..arch import ARCHITECTURES, Layout, Role, detect_from_config, detect_from_paths, locate
from ..config import with_module_ranks
from ..errors import ShapeError, UnsupportedError, UsageError
from ..formats.checkpoint import Checkpoint
from ..formats.dtypes import CODE_OF_NAME as DTYPE_CODES
from ..formats.dtypes import FLOAT_CODES as FLOAT_DTYPES
from ..formats.tensors import SafetensorsStore
from ..report import Report, plain
from .choices import EMBEDDING_MODES
from .lowrank import DEFAULT_MAX_RANK, SEED, check_rank_or_energy, low_rank_factors, require_finite
from .device import resolve_device
from .extract_experts import ExpertExtraction



@dataclass
class ExtractedModule:
    name: str
    role: str
    shape: list[int]
    rank: int
    retained_energy: float  # Σ kept σ² / ‖D‖², exact for the factors before rounding
    relative_error: float  # ‖D − B·A‖ / ‖D‖ with the factors as written (rounded to the output dtype)
    svd: str  # "randomized" or "exact"


@dataclass
class ExtractReport(Report):
    base: str
    finetuned: str
    out: str = ""
    modules: list[ExtractedModule] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # tensors stored whole (modules_to_save, biases)
    unchanged: int = 0
    tied_embedding: bool = False
    energy_not_reached: list[str] = field(default_factory=list)  # --energy above what --max-rank allows
    # Changed tensors the adapter does not carry: a model built from it differs from FINETUNED there.
    not_extracted: dict[str, str] = field(default_factory=dict)  # tensor name -> why

    @property
    def summary(self) -> dict[str, Any]:
        return {
            "modules": len(self.modules),
            "tensors_unchanged": self.unchanged,
            "lora_parameters": sum(m.rank * sum(m.shape) for m in self.modules),
            "min_retained_energy": min((m.retained_energy for m in self.modules), default=1.0),
            "max_relative_error": max((m.relative_error for m in self.modules), default=0.0),
        }

    def _json(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "finetuned": self.finetuned,
            "out": self.out,
            "modules": plain(self.modules),
            "saved": self.saved,
            "not_extracted": self.not_extracted,
            "energy_not_reached": self.energy_not_reached,
            "tied_embedding": self.tied_embedding,
            "summary": self.summary,
        }

    def render(self) -> str:
        lines = [f"{'module':<48} {'shape':>12} {'rank':>5} {'energy':>8} {'rel.err':>9} svd"]
        for m in self.modules:
            shape = "x".join(map(str, m.shape))
            lines.append(f"{m.name[-48:]:<48} {shape:>12} {m.rank:>5} {m.retained_energy:>8.4f} {m.relative_error:>9.2e} {m.svd}")
        s = self.summary
        lines.append("")
        lines.append(f"{s['modules']} modules extracted, {s['lora_parameters']:,} LoRA parameters; {s['tensors_unchanged']} tensors unchanged")
        lines.append(f"lowest retained energy {s['min_retained_energy']:.4f}, largest relative error {s['max_relative_error']:.2e}")
        for name in self.saved:
            lines.append(f"stored whole: {name}")
        if self.energy_not_reached:
            lines.append(f"warning: {len(self.energy_not_reached)} modules need more than --max-rank to reach --energy")
        for name, why in self.not_extracted.items():
            lines.append(f"warning: not in the adapter: {name}: {why}")
        return "\n".join(lines)


def extract_adapter(
    base: Checkpoint,
    finetuned: Checkpoint,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int = DEFAULT_MAX_RANK,
    modules: Iterable[str] | None = None,
    embeddings: str = "lora",
    device: str = "auto",
    dtype: str | None = None,
    exact: bool = False,
    base_name: str | None = None,
) -> tuple[Adapter, ExtractReport]:
    """The adapter (in memory) and its report. `modules`: roles (attn_q, ffn_down...) or leaf
    names (q_proj...) to extract; None: every changed Linear/Conv1D module. `embeddings`:
    a changed token embedding becomes LoRA ("lora"), is stored whole ("save", modules_to_save) or
    is left out and reported ("skip")."""
    check_rank_or_energy(rank, energy)
    if max_rank < 1:
        raise UsageError(f"--max-rank must be at least 1, got {max_rank}")
    if embeddings not in EMBEDDING_MODES:
        raise UsageError(f"--embeddings must be one of {', '.join(EMBEDDING_MODES)}, got {embeddings!r}")
    if dtype is not None and dtype not in DTYPE_CODES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPE_CODES)}, got {dtype!r}")
    for checkpoint in (base, finetuned):
        if checkpoint.quantized:
            raise UnsupportedError(f"{checkpoint.path} is a quantized checkpoint ({checkpoint.describe_quantization()}); "
                                   "extract compares 16-bit weights: give the unquantized models", code="quantized-base")
    wanted = set(modules) if modules is not None else None
    dev = resolve_device(device)
    arch, prefix, head = _architecture(base)
    resized = _resized_vocabulary(base, finetuned, arch, prefix)
    _require_same_tensors(base, finetuned, resized)
    tied, head_path = _tied_embedding(base, arch, prefix)
    report = ExtractReport(str(base.path), str(finetuned.path), tied_embedding=tied is not None)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    to_save: list[str] = []
    conv1d = False
    generator = torch.Generator(device=dev).manual_seed(SEED)
    stores = _Stores(base, finetuned)
    experts = ExpertExtraction((base.config or {}).get("model_type"), base.weight_map, lambda n: base.info(n).shape)
    expert_results = []
    for name in _file_order(base):
        info = base.info(name)
        base_t, tuned_t, same = stores.pair(name)
        slot = experts.slot(name)
        if slot is not None and not _non_float(info, finetuned, name):
            if not _expert_wanted(slot.parameter, experts, wanted):
                if same:
                    report.unchanged += 1
                else:
                    report.not_extracted[name] = "changed, not in --modules"
                continue
            diff = None if same else tuned_t.to(dev, torch.float32).sub_(base_t.to(dev, torch.float32))
            expert_results += experts.add(name, diff, rank, energy, max_rank, exact, generator, _torch_dtype(dtype, info.dtype))
            report.unchanged += same
            continue
        if same:
            report.unchanged += 1
            continue
        module_path, _, leaf = name.rpartition(".")
        ref = locate(arch, prefix, module_path)
        non_float = next((f"{side} {d}" for side, d in (("BASE", info.dtype), ("FINETUNED", finetuned.info(name).dtype))
                          if d not in FLOAT_DTYPES), None)
        if non_float and leaf == "weight" and ref is not None:
            raise UnsupportedError(f"{name}: a {non_float} weight of module {module_path}; extract computes FINETUNED − BASE "
                                   "of float weights only (an integer or quantized checkpoint?): give both models in "
                                   "float16, bfloat16 or float32", code="non-float-weight")
        if non_float:
            report.not_extracted[name] = f"changed {non_float.split()[-1]} tensor (not a float weight)"
            continue
        if leaf == "bias":
            report.not_extracted[name] = "changed bias"  # saved below if its module is extracted
            continue
        if leaf != "weight" or ref is None or len(info.shape) != 2:
            report.not_extracted[name] = "changed, not a Linear/Conv1D/embedding weight (LoRA cannot carry it)"
            continue
        if wanted is not None and not ({ref.role.value, module_path.rsplit(".", 1)[-1]} & wanted):
            report.not_extracted[name] = "changed, not in --modules"
            continue
        out_dtype = _torch_dtype(dtype, info.dtype)
        if (ref.layout is Layout.EMBEDDING and embeddings != "lora") or name in resized:
            if embeddings == "save" or name in resized:  # a resized vocabulary: its rows, whole
                tensors[f"{PREFIX}{name}"] = tuned_t.to(out_dtype)
                if module_path == tied:  # PEFT (ensure_weight_tying) also stores the head's tied copy
                    tensors[f"{PREFIX}{head_path}.weight"] = tensors[f"{PREFIX}{name}"]
                to_save.append(module_path)
                report.saved.append(name)
            else:
                report.not_extracted[name] = "changed embedding, --embeddings skip"
            continue
        diff = tuned_t.to(dev, torch.float32).sub_(base_t.to(dev, torch.float32))
        del base_t, tuned_t
        shape = list(diff.shape)  # reported as the base weight is stored (as svd does)
        d = ref.layout.lora_view(diff)
        conv1d |= ref.layout is Layout.CONV1D
        require_finite(f"module {module_path}", d, where="FINETUNED − BASE")  # before the SVD's LinAlgError
        total = float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
        a, b, kept, method = low_rank_factors(d, total, rank, energy, max_rank, exact, generator)
        a, b = a.to(out_dtype), b.to(out_dtype)
        error = float(torch.linalg.vector_norm(d - b.to(torch.float32) @ a.to(torch.float32)))
        k = a.shape[0]
        if energy is not None and kept < energy * (1 - 1e-9):
            report.energy_not_reached.append(module_path)
        a_key, b_key = factor_keys(module_path, ref.layout is Layout.EMBEDDING)
        tensors[a_key], tensors[b_key] = a.cpu().contiguous(), b.cpu().contiguous()
        if module_path == tied:
            # PEFT's ensure_weight_tying gives the tied head the same ΔW and expects its factors
            # in the file: head ΔW (vocab, dim) = Aᵀ·Bᵀ of the embedding's factors.
            head_a, head_b = factor_keys(head_path, False)
            tensors[head_a], tensors[head_b] = b.T.cpu().contiguous(), a.T.cpu().contiguous()
        ranks[module_path] = (k, k)  # alpha = r: scaling 1
        report.modules.append(
            ExtractedModule(module_path, ref.role.value, shape, k, kept, error / math.sqrt(total) if total > 0 else 0.0, method)
        )
    fused_ranks: dict[str, tuple[int, float]] = {}
    written = experts.write(tensors, fused_ranks)
    shapes = {r.parameter: r.shape for r in expert_results if r.shape}
    for result in expert_results:  # every expert of a written parameter: an unchanged one has zero factors of rank k
        if result.parameter in written:
            k = written[result.parameter]
            report.modules.append(ExtractedModule(
                f"{result.parameter}[{result.expert}]", experts.params[result.parameter].fused.role.value,
                shapes[result.parameter], k,
                result.kept, result.error / math.sqrt(result.total) if result.total > 0 else 0.0, result.method))
            if energy is not None and result.kept < energy * (1 - 1e-9):
                report.energy_not_reached.append(f"{result.parameter}[{result.expert}]")
    if not report.modules and not report.saved and not report.not_extracted:
        raise ShapeError(f"{finetuned.path}: every tensor equals BASE's; there is no difference to extract "
                         "(was FINETUNED given twice, or saved before training?); nothing was written", code="no-difference")
    biases = _module_biases(report, ranks, stores, finetuned, dtype, tensors)
    raw = _config(base_name or str(base.path), ranks, to_save, conv1d, tied, biases, head)
    if fused_ranks:
        raw["target_parameters"] = sorted(fused_ranks)  # exact parameter paths, as target_modules
    adapter = Adapter.from_tensors(with_module_ranks(raw, {**ranks, **fused_ranks}, use_rslora=False), tensors,
                                   source="extract")
    return adapter, report


def _expert_wanted(parameter: str, experts: ExpertExtraction, wanted: set[str] | None) -> bool:
    """--modules picks a fused expert parameter by its role (expert_gate_up) or leaf (gate_up_proj)."""
    return wanted is None or bool({experts.params[parameter].fused.role.value, parameter.rpartition(".")[2]} & wanted)


def _non_float(info, finetuned: Checkpoint, name: str) -> bool:
    return info.dtype not in FLOAT_DTYPES or finetuned.info(name).dtype not in FLOAT_DTYPES


# ---- checkpoints ----------------------------------------------------------------------------


class _Stores:
    """Tensors of both checkpoints, read with plain reads, one at a time."""

    def __init__(self, base: Checkpoint, finetuned: Checkpoint):
        self._stores = {id(c): {s: SafetensorsStore(c.file(s), h) for s, h in c.shards.items()} for c in (base, finetuned)}
        self.base, self.finetuned = base, finetuned

    def _store(self, checkpoint: Checkpoint, name: str) -> SafetensorsStore:
        return self._stores[id(checkpoint)][checkpoint.weight_map[name]]

    def get(self, checkpoint: Checkpoint, name: str) -> torch.Tensor:
        return self._store(checkpoint, name).get(name)

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(base tensor, fine-tuned tensor, bit-identical?): each read once."""
        base, tuned = self.get(self.base, name), self.get(self.finetuned, name)
        same = base.dtype == tuned.dtype and torch.equal(_bits(base), _bits(tuned))
        return base, tuned, same


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (so NaN equals NaN and -0 differs from 0, as in the file)."""
    return t.reshape(-1).view(torch.uint8)


def _file_order(checkpoint: Checkpoint) -> list[str]:
    """Tensor names shard by shard, in file order: sequential reads."""
    names = []
    for header in checkpoint.shards.values():
        names += sorted(header.tensors, key=lambda n: header.tensors[n].start)
    return names


def _resized_vocabulary(base: Checkpoint, finetuned: Checkpoint, arch, prefix: str) -> set[str]:
    """Token tensors (the embedding, a stored lm_head) whose rows FINETUNED has more or fewer of:
    a fine-tune with added tokens (resize_token_embeddings). Stored whole, as modules_to_save,
    whatever --embeddings says (mergekit's choice): no LoRA changes a shape."""
    out = set()
    for name in set(base.weight_map) & set(finetuned.weight_map):
        b, f = base.info(name).shape, finetuned.info(name).shape
        ref = locate(arch, prefix, name.rpartition(".")[0])
        if (ref is not None and ref.role in (Role.TOKEN_EMBED, Role.LM_HEAD) and name.endswith(".weight")
                and len(b) == len(f) == 2 and b[1] == f[1] and b[0] != f[0]):
            out.add(name)
    return out


def _require_same_tensors(base: Checkpoint, finetuned: Checkpoint, resized: set[str] = frozenset()) -> None:
    only_base = sorted(set(base.weight_map) - set(finetuned.weight_map))
    only_ft = sorted(set(finetuned.weight_map) - set(base.weight_map))
    if only_base or only_ft:
        side, names = ("BASE", only_base) if only_base else ("FINETUNED", only_ft)
        raise ShapeError(
            f"the checkpoints hold different tensors: only {side} has {', '.join(names[:3])}"
            + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            + " (an adapter cannot add or remove tensors)"
        )
    for name in base.weight_map:
        b, f = base.info(name), finetuned.info(name)
        if b.shape != f.shape and name not in resized:
            raise ShapeError(f"{name}: BASE {list(b.shape)} but FINETUNED {list(f.shape)}; an adapter cannot change shapes "
                             "(only a resized vocabulary's embedding and head, stored whole)")


def _architecture(base: Checkpoint):
    """(family, backbone prefix, head classes) from config.json, else from the tensor names."""
    detection = detect_from_config(base.config) if base.config else None
    if detection is None or not detection.known or detection.prefix is None:
        paths = sorted({n.rpartition(".")[0] for n in base.weight_map})
        found = detect_from_paths(paths, model_type=detection.architecture if detection and detection.known else None)
        if found.known and (detection is None or not detection.known or found.architecture == detection.architecture):
            detection = found
    if detection is None or not detection.known:
        why = detection.reason if detection is not None else "no config.json and no known module names"
        raise UnsupportedError(f"cannot tell which modules of BASE are Linear layers: {why}")
    arch = ARCHITECTURES[detection.architecture]
    head = arch.head(detection.head) if detection.head else None
    prefix = detection.prefix if detection.prefix is not None else (head.prefix if head else arch.heads[0].prefix)
    return arch, prefix, head


def _tied_embedding(base: Checkpoint, arch, prefix: str) -> tuple[str | None, str | None]:
    """(token embedding path, lm_head path) when the head is tied to the embedding (no lm_head
    tensor stored), else (None, None)."""
    roles = {}
    for name in base.weight_map:
        ref = locate(arch, prefix, name.rpartition(".")[0])
        if ref is not None:
            roles.setdefault(ref.role, name.rpartition(".")[0])
    head = arch.template(Role.LM_HEAD)
    embed = roles.get(Role.TOKEN_EMBED)
    tie = (base.config or {}).get("tie_word_embeddings", Role.LM_HEAD not in roles)
    if embed is None or head is None or not tie or Role.LM_HEAD in roles:
        return None, None
    return embed, head.path


def _torch_dtype(dtype: str | None, code: str) -> torch.dtype:
    from ..formats.torch_dtypes import torch_dtype

    return torch_dtype(DTYPE_CODES[dtype] if dtype else code)


def _module_biases(report, ranks, stores, finetuned, dtype, tensors) -> bool:
    """Changed biases of extracted modules travel as PEFT's bias="lora_only" (exact); the others
    stay in report.not_extracted."""
    saved = False
    for name in list(report.not_extracted):
        module_path, _, leaf = name.rpartition(".")
        if leaf == "bias" and module_path in ranks:
            tensor = stores.get(finetuned, name)
            tensors[f"{PREFIX}{module_path}.base_layer.bias"] = tensor.to(_torch_dtype(dtype, finetuned.info(name).dtype))
            report.saved.append(name)
            del report.not_extracted[name]
            saved = True
    return saved


def _config(base_name: str, ranks, to_save, conv1d: bool, tied: str | None, biases: bool, head) -> dict[str, Any]:
    embedding_touched = tied is not None and (tied in ranks or tied in to_save)
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": base_name,
        "r": 1,
        "lora_alpha": 1,
        "target_modules": sorted(ranks),  # exact paths, as convert writes them
        "modules_to_save": sorted(to_save) or None,
        "bias": "lora_only" if biases else "none",
        "fan_in_fan_out": conv1d,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        # A tied head shares the embedding's weight: PEFT ties the adapter to it only when asked.
        "ensure_weight_tying": embedding_touched,
        # Only CAUSAL_LM: PEFT's classification task types add the classifier to modules_to_save,
        # which this adapter may not carry.
        "task_type": "CAUSAL_LM" if head is not None and head.name == "causal-lm" else None,
        "auto_mapping": {"base_model_class": head.classes[0], "parent_library": "transformers"} if head and head.classes else None,
    }

