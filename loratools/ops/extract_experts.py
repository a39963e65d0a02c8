"""extract on mixture-of-experts checkpoints: FINETUNED − BASE of the experts, written as LoRA on
transformers 5's fused expert parameters (PEFT's `target_parameters`), the only expert LoRA PEFT
loads on transformers 5 (it has no per-expert modules to target).

The checkpoints store the experts as transformers' conversion saves them (arch/experts.py): one
tensor per expert and part (gate and up joined along d1 into gate_up_proj), or the fused
(E, d1, d2) parameter itself (gpt_oss). Expert e's difference D_e is its (d1, d2) slice — the
LoRA target is D_e, or D_eᵀ where the family's parameter is (E, in, out) — factored by the same
truncated SVD as any module, as soon as the expert's parts are read (memory: one expert's
difference plus the factors). PEFT has one r per parameter: with --rank K every expert gets K;
with --energy T each expert keeps its own k_e and is padded with zero rows to the parameter's
largest k_e (ΔW_e is then exactly its rank-k_e approximation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..adapter import factor_keys
from ..arch import experts as moe
from .lowrank import low_rank_factors, require_finite


@dataclass(frozen=True)
class Slot:
    """Where an on-disk tensor goes: part `part` of expert `expert` (None: the tensor holds every
    expert, (E, d1, d2)) of the fused parameter `parameter` (its in-memory path)."""

    parameter: str
    expert: int | None
    part: int


@dataclass
class FusedDiff:
    """One fused parameter being extracted: its experts' parts as they arrive, then their factors."""

    layout: moe.ExpertsLayout
    fused: moe.FusedParameter
    num_experts: int
    parts: dict[int, dict[int, torch.Tensor | None]] = field(default_factory=dict)  # expert -> part -> D (None: unchanged)
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # expert -> (A_e, B_e)
    changed: bool = False


@dataclass
class ExpertResult:
    """An expert's factorisation, for the report."""

    parameter: str
    expert: int
    shape: list[int]  # (d1, d2) as the parameter holds it
    kept: float
    error: float  # ‖D − B·A‖ with the factors as written
    total: float  # ‖D‖²
    method: str


class ExpertExtraction:
    """Recognises a checkpoint's expert tensors (by the family's table) and turns their differences
    into fused-experts LoRA factors."""

    def __init__(self, model_type: str | None, names, shapes):
        self.layout = moe.layout_for(model_type)
        self.slots: dict[str, Slot] = {}
        self.params: dict[str, FusedDiff] = {}
        if self.layout is None:
            return
        counts: dict[str, set[int]] = {}
        for name in names:
            slot = self._slot(name, shapes(name))
            if slot is not None:
                self.slots[name] = slot
                counts.setdefault(slot.parameter, set()).add(-1 if slot.expert is None else slot.expert)
        for parameter, experts in counts.items():
            fused = self._fused(parameter)
            stacked = experts == {-1}
            n = shapes(next(n for n, s in self.slots.items() if s.parameter == parameter))[0] if stacked else len(experts)
            if not stacked and experts != set(range(n)):
                continue  # experts missing from the checkpoint: left to the plain path, which reports them
            self.params[parameter] = FusedDiff(self.layout, fused, n)
        self.slots = {k: s for k, s in self.slots.items() if s.parameter in self.params}

    def _fused(self, parameter: str) -> moe.FusedParameter:
        leaf = parameter.rpartition(".")[2]
        return next(p for p in self.layout.parameters if p.name == leaf)

    def _slot(self, name: str, shape) -> Slot | None:
        layout = self.layout
        for fused in layout.parameters:
            if not fused.parts:
                if len(shape) == 3 and (name == f"{layout.module}.{fused.name}" or name.endswith(f".{layout.module}.{fused.name}")):
                    return Slot(name, None, 0)
                continue
            for k, part in enumerate(fused.parts):
                found = re.fullmatch(rf"(.*?){re.escape(layout.disk_module)}\.(\d+)\.{re.escape(part.leaf)}", name)
                if found and len(shape) == 2:
                    return Slot(f"{found[1]}{layout.module}.{fused.name}", int(found[2]), k)
        return None

    def slot(self, name: str) -> Slot | None:
        return self.slots.get(name)

    def add(self, name: str, diff: torch.Tensor | None, rank, energy, max_rank, exact, generator, out_dtype) -> list[ExpertResult]:
        """Record tensor `name`'s difference (None: unchanged); factor every expert it completes."""
        slot = self.slots[name]
        param = self.params[slot.parameter]
        if diff is None:
            experts = range(param.num_experts) if slot.expert is None else [slot.expert]
            for e in experts:
                param.parts.setdefault(e, {})[slot.part] = None
        elif slot.expert is None:
            for e in range(param.num_experts):
                param.parts.setdefault(e, {})[0] = diff[e]
        else:
            param.parts.setdefault(slot.expert, {})[slot.part] = diff
        results = []
        for e, parts in list(param.parts.items()):
            if len(parts) == max(1, len(param.fused.parts)) and e not in param.factors:
                results.append(self._factor(slot.parameter, param, e, rank, energy, max_rank, exact, generator, out_dtype))
        return results

    def _factor(self, parameter, param: FusedDiff, e, rank, energy, max_rank, exact, generator, out_dtype) -> ExpertResult:
        parts = param.parts.pop(e)
        pieces = [parts[k] for k in sorted(parts)]
        if all(p is None for p in pieces):
            param.factors[e] = None  # unchanged: zero factors of the parameter's rank, filled in at the end
            return ExpertResult(parameter, e, [], 1.0, 0.0, 0.0, "exact")
        known = next(p for p in pieces if p is not None)
        pieces = [p if p is not None else torch.zeros_like(known) for p in pieces]  # an unchanged part is a zero block
        matrix = torch.cat(pieces, dim=0)
        d = matrix.T if param.layout.transposed else matrix  # the LoRA target B_e·A_e
        require_finite(f"{parameter}[{e}]", d, where="FINETUNED − BASE")
        total = float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
        a, b, kept, method = low_rank_factors(d, total, rank, energy, max_rank, exact, generator)
        a, b = a.to(out_dtype).cpu(), b.to(out_dtype).cpu()
        error = float(torch.linalg.vector_norm(d - b.to(d.device, torch.float32) @ a.to(d.device, torch.float32)))
        param.factors[e] = (a, b)
        param.changed = True
        return ExpertResult(parameter, e, list(matrix.shape), kept, error, total, method)

    def incomplete(self) -> list[str]:
        return sorted(p for p, param in self.params.items() if len(param.factors) < param.num_experts)

    def write(self, tensors: dict, ranks: dict) -> dict[str, int]:
        """The fused factors of every changed parameter, under the keys PEFT saves them (one
        `.base_layer` deeper per targeted parameter registered before it in its module), with
        A (k·E, in) holding expert e's rows e·k…, B (out, k·E) its columns e, e+E, …. Returns
        {parameter: k}."""
        changed = {p: param for p, param in self.params.items() if param.changed}
        by_module: dict[str, list[str]] = {}
        for parameter in changed:
            by_module.setdefault(parameter.rpartition(".")[0], []).append(parameter)
        order = [p.name for p in self.layout.parameters] if self.layout else []
        out = {}
        for module, parameters in by_module.items():
            parameters.sort(key=lambda p: order.index(p.rpartition(".")[2]))
            for i, parameter in enumerate(parameters):
                param = changed[parameter]
                present = [f for f in param.factors.values() if f is not None]
                k = max(a.shape[0] for a, _ in present)
                width, height, dtype = present[0][0].shape[1], present[0][1].shape[0], present[0][0].dtype
                n = param.num_experts
                a_out, b_out = torch.zeros((k * n, width), dtype=dtype), torch.zeros((height, k * n), dtype=dtype)
                for e, f in param.factors.items():
                    if f is not None:  # rows/columns past its own k stay zero
                        a_out[e * k: e * k + f[0].shape[0]] = f[0]
                        b_out[:, e::n][:, : f[1].shape[1]] = f[1]
                a_key, b_key = factor_keys(module + ".base_layer" * (len(parameters) - 1 - i), False)
                tensors[a_key], tensors[b_key] = a_out.contiguous(), b_out.contiguous()
                ranks[parameter] = (k, k)  # alpha = r: scaling 1
                out[parameter] = k
        return out
