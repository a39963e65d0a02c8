"""`loratools convert --to-lora`: an adapter as the plainest LoRA there is — scaling 1 in every
module — so that serving runtimes read it as PEFT does.

Serving runtimes apply one scaling rule to a whole adapter (vLLM: the config's lora_alpha/r,
ignoring rank_pattern and alpha_pattern; llama.cpp: one alpha per file). An adapter whose
modules each have scaling 1 is read the same by all of them and by PEFT.

- Plain LoRA modules keep their ΔW exactly: B becomes s·B (float32, one rounding of that
  product), A is kept, lora_alpha = the module's rank (use_rslora off), pinned by exact patterns
  where it differs from the most common one. A lora_B.bias (merged as s·bias) becomes s·bias.
- DoRA modules (with the base, `--base`): their ΔW = W' − W, where W' = m/‖W+s·B·A‖_row·(W+s·B·A)
  as PEFT merges it, is not low-rank; it becomes its best rank-K approximation (truncated SVD,
  Eckart–Young), K from `rank` or the smallest rank keeping the fraction `energy` of ‖ΔW‖²;
  exact when K reaches min(out, in). The relative error ‖ΔW − ΔW_K‖/‖ΔW‖ is reported per module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..adapter import Adapter, LoraModule
from ..config import with_module_ranks
from ..errors import UnsupportedError, UsageError
from ..formats.checkpoint import Checkpoint
from ..report import Report
from .basemap import BaseNameMapper, adapter_for_base
from .dequant import read_float32
from .initial import check_on_base
from .lowrank import DEFAULT_MAX_RANK, SEED, check_rank_or_energy, low_rank_factors, require_finite
from .merge.kernel_torch import dora_weight


@dataclass
class DoraModule:
    name: str
    rank: int  # of the LoRA written
    retained_energy: float  # Σ kept σ² / Σ σ² of the DoRA ΔW
    relative_error: float  # ‖ΔW − B'·A'‖ / ‖ΔW‖


@dataclass
class ToLoraReport(Report):
    adapter: str
    out: str
    modules: int
    rescaled: list[str] = field(default_factory=list)  # plain modules whose scaling was not already 1
    dora: list[DoraModule] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"converted to plain LoRA (scaling 1 in every module) into {self.out}: {self.modules} modules, "
                 f"{len(self.rescaled)} with their scaling folded into B"]
        if self.dora:
            worst = max(self.dora, key=lambda m: m.relative_error)
            lines.append(f"{len(self.dora)} DoRA modules as rank-{'/'.join(sorted({str(m.rank) for m in self.dora}))} LoRA; "
                         f"largest relative error ‖ΔW−ΔW_K‖/‖ΔW‖ {worst.relative_error:.3g} ({worst.name})")
            lines += [f"  {m.name:<48} rank {m.rank:<5} energy kept {m.retained_energy:.6f}  error {m.relative_error:.3g}"
                      for m in self.dora]
        return "\n".join(lines)


def to_plain_lora(adapter: Adapter, base: Checkpoint | None = None, rank: int | None = None, energy: float | None = None,
                  max_rank: int = DEFAULT_MAX_RANK) -> tuple[Adapter, ToLoraReport]:
    adapter.require_supported("convert", experts=True)
    if base is not None and check_on_base(base, adapter):
        base = None  # --initial: the base was for checking the initial adapter; the conversion does not use it
    doras = [p for p, m in adapter.modules.items() if m.magnitude_key]
    if doras and base is None:
        raise UsageError(f"module {doras[0]} is DoRA: its ΔW depends on the base weight; give --base BASE "
                         "and --rank K or --energy T")
    if not doras and (rank is not None or energy is not None or base is not None):
        raise UsageError("--base, --rank and --energy are for DoRA adapters (plain LoRA converts exactly without them)")
    if doras:
        check_rank_or_energy(rank, energy)
    for path, module in adapter.modules.items():
        if module.diag_key or (module.magnitude_key and module.lora_bias_key):
            what = "KaSA" if module.diag_key else "DoRA with lora_bias"
            raise UnsupportedError(f"module {path}: {what} has no plain LoRA form; merge it into the base instead (loratools merge)")
    if doras:
        adapter = adapter_for_base(base, adapter)
    tensors = adapter.state_dict()
    ranks: dict[str, tuple[int, float]] = {}
    report = ToLoraReport(adapter.source, "", len(adapter.modules) + len(adapter.experts))
    mapper = BaseNameMapper(base, adapter) if doras else None
    generator = torch.Generator().manual_seed(SEED)
    for path, module in adapter.modules.items():
        if module.magnitude_key:
            k = _dora_to_lora(adapter, module, base, mapper, tensors, rank, energy, max_rank, generator, report)
            ranks[path] = (k, float(k))
            continue
        ranks[path] = (module.rank, float(module.rank))  # alpha = r: scaling 1
        if module.scaling == 1.0:
            continue
        report.rescaled.append(path)
        tensors[module.b_key] = tensors[module.b_key].to(torch.float32) * module.scaling
        tensors[module.a_key] = tensors[module.a_key].to(torch.float32)
        if module.lora_bias_key:
            tensors[module.lora_bias_key] = tensors[module.lora_bias_key].to(torch.float32) * module.scaling
    for path, expert in adapter.experts.items():  # fused MoE experts: one s for every expert, folded into B
        ranks[path] = (expert.rank, float(expert.rank))  # (PEFT matches the patterns against the parameter's path)
        if expert.scaling != 1.0:
            report.rescaled.append(path)
            tensors[expert.b_key] = tensors[expert.b_key].to(torch.float32) * expert.scaling
            tensors[expert.a_key] = tensors[expert.a_key].to(torch.float32)
    raw = with_module_ranks({**adapter.config.raw, "use_dora": False}, ranks, use_rslora=False)
    return Adapter.from_tensors(raw, tensors, source=adapter.source), report


def _dora_to_lora(adapter: Adapter, module: LoraModule, base: Checkpoint, mapper: BaseNameMapper, tensors, rank, energy,
                  max_rank, generator, report: ToLoraReport) -> int:
    """Replace the module's tensors by the best low-rank LoRA of its DoRA ΔW; returns its rank."""
    name = mapper.find(f"{module.path}.weight", f"module {module.path}")
    w = torch.from_numpy(read_float32(base, name).copy())
    if tuple(w.shape) != module.weight_shape:
        raise UsageError(f"module {module.path}: base {name} is {list(w.shape)}, the adapter needs {list(module.weight_shape)}")
    a, b = (t.to(torch.float32) for t in adapter.factors(module.path))
    magnitude = adapter.tensor(module.magnitude_key).to(torch.float32)
    merged = dora_weight(w.clone(), a, b, module.scaling, magnitude, module.layout)
    delta = merged - w
    d = module.layout.lora_view(delta)
    require_finite(f"module {module.path}", d, where="its DoRA ΔW on --base")
    total = float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
    new_a, new_b, kept, _ = low_rank_factors(d, total, rank, energy, max_rank, False, generator)
    error = float(torch.linalg.vector_norm(d - new_b @ new_a)) / math.sqrt(total) if total > 0 else 0.0
    del tensors[module.magnitude_key]
    tensors[module.a_key], tensors[module.b_key] = new_a.contiguous(), new_b.contiguous()
    report.dora.append(DoraModule(module.path, new_a.shape[0], kept, error))
    return new_a.shape[0]
