"""`loratools resize`: the best rank-K (or energy-T) approximation of every module's ΔW."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..adapter import Adapter, ExpertModule
from ..config import with_module_ranks
from ..report import Report
from .lowrank import balanced_factors, check_rank_or_energy, energy_rank, factored_svd


@dataclass
class ResizedModule:
    name: str
    old_rank: int
    new_rank: int
    retained_energy: float  # Σ kept σ² / Σ σ², 1.0 when kept exactly


def resize_adapter(adapter: Adapter, rank: int | None = None, energy: float | None = None) -> tuple[Adapter, list[ResizedModule]]:
    """Each module becomes the truncated SVD of its ΔW = s·B·A at rank K (or the smallest rank
    reaching energy T). Modules already at or below the target keep their tensors bit for bit.

    A truncated module is written as balanced factors B' = U·√S, A' = √S·Vh with scaling 1
    (alpha = k, or √k under rsLoRA), its (rank, alpha) pinned by an exact pattern; the DoRA
    magnitude, lora_B.bias and extra tensors are kept as they are.
    """
    check_rank_or_energy(rank, energy)
    adapter.require_supported("resize", experts=True)
    use_rslora = adapter.config.use_rslora
    tensors = adapter.state_dict()
    ranks: dict[str, tuple[int, float]] = {}
    report = []
    for path, module in adapter.modules.items():
        a, b = adapter.factors(path)
        svd = factored_svd(b, a, module.scaling, vectors=True, name=path)
        sigma = [float(x) for x in svd.s]
        k = rank if rank is not None else max(1, energy_rank(sigma, energy))
        if k >= module.rank:
            ranks[path] = (module.rank, module.alpha)
            report.append(ResizedModule(path, module.rank, module.rank, 1.0))
            continue
        new_a, new_b = balanced_factors(svd, k)
        new_a, new_b = (torch.from_numpy(np.ascontiguousarray(x)).to(t.dtype) for x, t in ((new_a, a), (new_b, b)))
        tensors[module.b_key], tensors[module.a_key] = new_b, new_a
        ranks[path] = (k, float(k) ** 0.5 if use_rslora else k)  # scaling alpha/r (or alpha/√r) = 1
        total = sum(x * x for x in sigma)
        kept = sum(x * x for x in sigma[:k])
        report.append(ResizedModule(path, module.rank, k, kept / total if total > 0 else 1.0))
    for path, expert in adapter.experts.items():
        report.append(_resize_experts(adapter, expert, rank, energy, tensors, ranks))
    raw = with_module_ranks(adapter.config.raw, ranks, use_rslora)
    resized = Adapter.from_tensors(raw, tensors, source=adapter.source)
    return resized, report


def _resize_experts(adapter: Adapter, expert: ExpertModule, rank: int | None, energy: float | None,
                    tensors: dict, ranks: dict) -> ResizedModule:
    """A fused-experts module: every expert's ΔW_e truncated at one rank k (the fused factors have
    r·E rows), the largest any expert needs for `energy`; written back in PEFT's layout (A's rows
    e·k…, B's columns e, e+E, …) with scaling 1."""
    views = [adapter.expert_slice(expert, e, (0, expert.out_features), transposed=False).path for e in range(expert.num_experts)]
    svds = []
    for path in views:
        a, b = adapter.factors(path)
        svds.append(factored_svd(b, a, expert.scaling, vectors=True, name=path))
    sigmas = [[float(x) for x in svd.s] for svd in svds]
    k = rank if rank is not None else max(max(1, energy_rank(sigma, energy)) for sigma in sigmas)
    if k >= expert.rank:
        ranks[expert.path] = (expert.rank, expert.alpha)
        return ResizedModule(expert.path, expert.rank, expert.rank, 1.0)
    a_dtype, b_dtype = tensors[expert.a_key].dtype, tensors[expert.b_key].dtype
    new_a = torch.empty((k * expert.num_experts, expert.in_features), dtype=a_dtype)
    new_b = torch.empty((expert.out_features, k * expert.num_experts), dtype=b_dtype)
    for e, svd in enumerate(svds):
        a_e, b_e = (torch.from_numpy(np.ascontiguousarray(x)) for x in balanced_factors(svd, k))
        new_a[e * k: (e + 1) * k], new_b[:, e::expert.num_experts] = a_e.to(a_dtype), b_e.to(b_dtype)
    tensors[expert.a_key], tensors[expert.b_key] = new_a, new_b
    ranks[expert.path] = (k, float(k) ** 0.5 if adapter.config.use_rslora else k)
    kept = [sum(x * x for x in s[:k]) / total if (total := sum(x * x for x in s)) > 0 else 1.0 for s in sigmas]
    return ResizedModule(expert.path, expert.rank, k, min(kept))


@dataclass
class ResizeReport(Report):
    adapter: str
    out: str
    modules: list[ResizedModule]
    summary: dict[str, Any]

    def render(self) -> str:
        s = self.summary
        return (f"resized into {self.out}: {s['truncated']} of {s['modules']} modules truncated, LoRA parameters "
                f"{s['lora_parameters_before']:,} -> {s['lora_parameters_after']:,}, lowest retained energy {s['min_retained_energy']:.4f}")


def resize_report(adapter: Adapter, out: str, modules: list[ResizedModule]) -> ResizeReport:
    old = {**adapter.modules, **adapter.experts}
    params_before = sum(old[m.name].num_lora_params for m in modules)
    params_after = sum(m.new_rank * (old[m.name].num_lora_params // old[m.name].rank) for m in modules)
    return ResizeReport(adapter.source, out, modules, {
        "modules": len(modules),
        "truncated": sum(m.new_rank < m.old_rank for m in modules),
        "lora_parameters_before": params_before,
        "lora_parameters_after": params_after,
        "min_retained_energy": min((m.retained_energy for m in modules), default=1.0),
    })
