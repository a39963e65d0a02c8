"""`loratools combine`: several adapters (same base architecture) into one PEFT adapter.

Exact methods work on ΔW = s·B·A as a low-rank product:
- cat: Σ wᵢ·ΔWᵢ exactly, by stacking the factors (the ranks add up);
- svd: the best rank-K approximation of that sum, from the stacked factors (QR + a small SVD).
PEFT's methods (linear, ties, dare_linear, dare_ties, magnitude_prune) combine A and B
separately, each input weighted by ±√|wᵢ·sᵢ|, exactly as `add_weighted_adapter` does; so
`linear` is not Σ wᵢ·ΔWᵢ (cross terms), and all of them need equal ranks.
Every output module has scaling 1 (lora_alpha = r, no rsLoRA), so the result never depends on
quirks of the inputs' configs.

Fused MoE experts (PEFT's target_parameters) are combined expert by expert, each expert's
(A_e, B_e) treated as a module of its own by the same method, and written back in PEFT's fused
layout at one rank for every expert (PEFT has one r per parameter): cat gives Σ rᵢ; svd the
--rank K, or the largest rank any expert needs for --energy T, or the largest input rank.
PEFT's own add_weighted_adapter refuses target_parameters; its methods are applied here per
expert (ties/magnitude_prune keep the top density of each expert's factor).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..adapter import Adapter, ExpertModule, factor_keys
from ..config import with_module_ranks
from ..errors import ShapeError, UnsupportedError, UsageError
from ..report import Report
from .choices import COMBINE_METHODS as METHODS
from .choices import MAJORITY_SIGNS
from .lowrank import balanced_factors, check_rank_or_energy, energy_rank, factored_svd

MaskFn = Callable[[torch.Tensor, float], torch.Tensor]  # (tensor, density) -> 0/1 mask like tensor


@dataclass
class CombineReport(Report):
    adapters: list[str] = field(default_factory=list)  # the inputs, as named
    out: str = ""
    method: str = "cat"
    weights: list[float] = field(default_factory=list)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> {"rank", "inputs"}
    carried: list[str] = field(default_factory=list)  # extra tensors copied from one input

    def render(self) -> str:
        ranks = sorted({m["rank"] for m in self.modules.values()})
        return f"combined {len(self.adapters)} adapters ({self.method}) into {self.out}: {len(self.modules)} modules, rank(s) {ranks}"


def combine_adapters(
    adapters: Sequence[Adapter],
    method: str = "cat",
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int = 0,
    mask_fn: MaskFn | None = None,
) -> tuple[Adapter, CombineReport]:
    """One adapter from several. A module missing from an input counts as zero there.
    `mask_fn` replaces DARE's seeded Bernoulli masks (for tests and experiments)."""
    weights = _check_inputs(adapters, method, weights, rank, energy, density, majority_sign)
    generator = torch.Generator().manual_seed(seed)
    mask_fn = mask_fn or (lambda t, d: torch.bernoulli(torch.full(t.shape, d, dtype=torch.float32), generator=generator))
    by_path: dict[str, list[tuple[Adapter, float]]] = defaultdict(list)
    for adapter, weight in zip(adapters, weights):
        for path in adapter.modules:
            by_path[path].append((adapter, weight))
    by_expert: dict[str, list[tuple[Adapter, float]]] = defaultdict(list)
    for adapter, weight in zip(adapters, weights):
        for path in adapter.experts:
            by_expert[path].append((adapter, weight))
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    report = CombineReport(adapters=[a.source for a in adapters], method=method, weights=list(weights))
    for path in sorted(by_expert):
        expert = _combine_experts(path, by_expert[path], method, rank, energy, density, majority_sign, mask_fn, tensors)
        ranks[path] = (expert.rank, expert.rank)  # alpha = r: scaling 1
        report.modules[path] = {"rank": expert.rank, "inputs": len(by_expert[path]), "experts": expert.num_experts}
    for path in sorted(by_path):
        inputs = by_path[path]
        first = inputs[0][0].modules[path]
        _check_shapes(path, inputs)
        if method == "cat":
            a, b = _stacked(path, inputs)  # cat: the stacked factors are the exact sum
        elif method == "svd":
            svd = _stacked_svd(path, inputs)
            a, b = _balanced(svd, _svd_rank([svd], [path], inputs, rank, energy))
        else:
            a, b = _peft_style(path, inputs, method, density, majority_sign, mask_fn)
        dtype = _factor_dtype(inputs[0][0], path)
        a_key, b_key = factor_keys(path, first.embedding)
        tensors[a_key], tensors[b_key] = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        ranks[path] = (a.shape[0], a.shape[0])  # alpha = r: scaling 1
        report.modules[path] = {"rank": a.shape[0], "inputs": len(inputs)}
    for adapter, weight in zip(adapters, weights):
        for extra in adapter.extras:
            tensors[extra.key] = adapter.tensor(extra.key)
            report.carried.append(extra.key)
    raw = _output_config(adapters)
    raw = with_module_ranks(raw, ranks, use_rslora=False)
    return Adapter.from_tensors(raw, tensors), report


def _combine_experts(path, inputs, method, rank, energy, density, majority_sign, mask_fn, tensors) -> ExpertModule:
    """A fused-experts module: each expert combined as a module of its own (its per-expert view,
    Adapter.expert_slice), at one rank k for all; written as A (k·E, in) with expert e's rows
    e·k…, B (out, k·E) with its columns e, e+E, … (PEFT reshapes B to (out, k, E)). Returns the
    output's ExpertModule (rank k)."""
    first = inputs[0][0].experts[path]
    shapes = {(a.experts[path].num_experts, a.experts[path].in_features, a.experts[path].out_features) for a, _ in inputs}
    if len(shapes) > 1:
        detail = ", ".join(f"{a.source}: {a.experts[path].num_experts} experts, in={a.experts[path].in_features} "
                           f"out={a.experts[path].out_features}" for a, _ in inputs)
        raise ShapeError(f"module {path}: incompatible fused experts across adapters ({detail})")
    n = first.num_experts
    for adapter, _ in inputs:  # register each input's per-expert views, under the same path in every input
        views = [adapter.expert_slice(adapter.experts[path], e, (0, first.out_features), transposed=False).path
                 for e in range(n)]
    if method == "cat":
        pairs = [_stacked(view, inputs) for view in views]
    elif method == "svd":
        svds = [_stacked_svd(view, inputs) for view in views]
        k = _svd_rank(svds, views, inputs, rank, energy)
        pairs = [_balanced(svd, k) for svd in svds]
    else:
        pairs = [_peft_style(view, inputs, method, density, majority_sign, mask_fn) for view in views]
    k = pairs[0][0].shape[0]
    a_dtype, b_dtype = (getattr(torch, inputs[0][0].tensors.meta(key).dtype) for key in (first.a_key, first.b_key))
    a_out = torch.empty((k * n, first.in_features), dtype=a_dtype)
    b_out = torch.empty((first.out_features, k * n), dtype=b_dtype)
    for e, (a, b) in enumerate(pairs):
        a_out[e * k: (e + 1) * k], b_out[:, e::n] = a.to(a_dtype), b.to(b_dtype)
    tensors[first.a_key], tensors[first.b_key] = a_out, b_out
    return ExpertModule(path=path, module=first.module, num_experts=n, rank=k, alpha=k, scaling=1.0,
                        a_key=first.a_key, b_key=first.b_key, in_features=first.in_features,
                        out_features=first.out_features, role=first.role, layer=first.layer)


def _factor_dtype(adapter: Adapter, path: str) -> torch.dtype:
    """The output keeps the (first) input's factor dtype; read from the header, not the data."""
    return getattr(torch, adapter.tensors.meta(adapter.modules[path].a_key).dtype)


# ---- checks ---------------------------------------------------------------------------------


def _check_inputs(adapters, method, weights, rank, energy, density, majority_sign) -> list[float]:
    if not adapters:
        raise UsageError("give at least one adapter")
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise UsageError(f"{len(weights)} weights for {len(adapters)} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise UsageError(f"--weights must be finite numbers, got {', '.join(map(str, weights))}")
    for adapter in adapters:
        adapter.require_supported("combine", experts=True)
    fused = {tuple(sorted(_target_parameters(a))) for a in adapters if a.experts}
    if len(fused) > 1:
        raise ShapeError("the adapters put LoRA on different fused MoE expert parameters "
                         f"({' vs '.join(map(str, sorted(fused)))}): PEFT nests one wrapper per parameter, so one adapter "
                         "needs one target_parameters list", code="fused-experts")
    if (rank is not None or energy is not None) and method != "svd":
        raise UsageError("--rank and --energy apply to --method svd only")
    check_rank_or_energy(rank, energy, required=False)
    needs_density = method in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
    if needs_density and density is None:
        raise UsageError(f"--method {method} needs --density D (the fraction of values kept, in [0, 1])")
    if density is not None and not (needs_density and 0 <= density <= 1):
        raise UsageError("--density is a fraction in [0, 1] and applies to ties, dare_*, magnitude_prune only")
    if majority_sign not in MAJORITY_SIGNS:
        raise UsageError(f"--majority-sign must be {' or '.join(MAJORITY_SIGNS)}, got {majority_sign!r}")
    archs = {a.architecture for a in adapters}
    if len(archs) > 1:
        names = ", ".join(f"{a.source}: {a.architecture or 'unknown'}" for a in adapters)
        raise ShapeError(f"the adapters are for different architectures ({names})")
    for adapter in adapters:
        if any(m.magnitude_key for m in adapter.modules.values()):
            raise UnsupportedError(f"{adapter.source}: DoRA adapters cannot be combined exactly (PEFT drops the magnitudes silently)")
        if any(m.lora_bias_key for m in adapter.modules.values()):
            raise UnsupportedError(f"{adapter.source}: lora_bias adapters cannot be combined exactly (PEFT drops the biases silently)")
    owners: dict[str, str] = {}
    for adapter, weight in zip(adapters, weights):
        for extra in adapter.extras:
            if extra.target in owners:
                raise ShapeError(f"{extra.target} is replaced by both {owners[extra.target]} and {adapter.source} "
                                 f"({extra.kind}): they cannot be combined")
            if weight != 1.0:
                raise UnsupportedError(f"{adapter.source}: its {extra.kind} tensor {extra.target} replaces a base tensor and "
                                       f"cannot be weighted by {weight}")
            owners[extra.target] = str(adapter.source)
    return weights


def _check_shapes(path: str, inputs) -> None:
    shapes = {(a.modules[path].embedding, a.modules[path].in_features, a.modules[path].out_features) for a, _ in inputs}
    if len(shapes) > 1:
        detail = ", ".join(f"{a.source}: in={a.modules[path].in_features} out={a.modules[path].out_features}" for a, _ in inputs)
        raise ShapeError(f"module {path}: incompatible shapes across adapters ({detail})")


# ---- methods --------------------------------------------------------------------------------


def _stacked(path: str, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """A_stack (Σr, in) and B_stack (out, Σr) with B_stack @ A_stack = Σ wᵢ·sᵢ·Bᵢ@Aᵢ (float32).
    wᵢ·sᵢ goes into A, as PEFT's cat does."""
    a_parts, b_parts = [], []
    for adapter, weight in inputs:
        module = adapter.module(path)
        a, b = adapter.factors(path)
        a_parts.append(a.float() * (weight * module.scaling))
        b_parts.append(b.float())
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)


def _stacked_svd(path, inputs):
    a, b = _stacked(path, inputs)
    return factored_svd(b, a, 1.0, vectors=True, name=path)


def _svd_rank(svds, paths, inputs, rank, energy) -> int:
    """One rank for all `svds` (a module's, or every expert's of a fused module): --rank, or the
    largest that --energy needs, or the largest input rank; at most the stacked rank."""
    if energy is not None:
        k = max(max(1, energy_rank([float(x) for x in svd.s], energy)) for svd in svds)
    else:
        k = rank if rank is not None else max(adapter.module(paths[0]).rank for adapter, _ in inputs)
    return min(k, svds[0].s.shape[0])


def _balanced(svd, k):
    return tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in balanced_factors(svd, k))


def _peft_style(path, inputs, method, density, majority_sign, mask_fn):
    ranks = {adapter.module(path).rank for adapter, _ in inputs}
    if len(ranks) > 1:
        raise ShapeError(f"module {path}: --method {method} needs equal ranks, got {sorted(ranks)}; use cat or svd")
    a_list, b_list, wa, wb = [], [], [], []
    for adapter, weight in inputs:
        a, b = adapter.factors(path)
        ws = weight * adapter.module(path).scaling
        sign = 1.0 if ws >= 0 else -1.0  # the sign goes on A only, or it would cancel
        wa.append(math.sqrt(abs(ws)) * sign)
        wb.append(math.sqrt(abs(ws)))
        a_list.append(a.float())
        b_list.append(b.float())
    combine = lambda ts, ws: _task_merge(ts, torch.tensor(ws), method, density, majority_sign, mask_fn)  # noqa: E731
    return combine(a_list, wa), combine(b_list, wb)


def _task_merge(tensors, weights, method, density, majority_sign, mask_fn) -> torch.Tensor:
    """PEFT's task-arithmetic family on a list of same-shaped tensors."""
    if method in ("ties", "magnitude_prune"):
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [t if density >= 1 else t * mask_fn(t, density) / density for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if method in ("ties", "dare_ties"):
        signs = stacked.sign()
        magnitude = stacked.sum(0) if majority_sign == "total" else signs.sum(0)
        majority = signs == torch.where(magnitude >= 0, 1.0, -1.0)
        return (weighted * majority).sum(0) / majority.sum(0).clamp(min=1)
    return weighted.sum(0)


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
    return t * mask.view(t.shape)


def _target_parameters(adapter: Adapter) -> list[str]:
    listed = adapter.config.raw.get("target_parameters")
    return list(listed) if isinstance(listed, list) else []


# ---- config ---------------------------------------------------------------------------------


def _output_config(adapters: Sequence[Adapter]) -> dict[str, Any]:
    raw = dict(adapters[0].config.raw)
    targets = [a.config.target_modules for a in adapters]
    if all(isinstance(t, list) for t in targets):
        union = sorted({name for t in targets for name in t})
    elif all(isinstance(t, str) for t in targets):
        union = "|".join(f"({t})" for t in targets)
    else:  # a mix of names and regexes: name the modules themselves
        union = sorted({p for a in adapters for p in a.modules})
    to_save = sorted({name for a in adapters for name in a.config.modules_to_save})
    fused = next((_target_parameters(a) for a in adapters if a.experts), None)
    if fused is not None:
        raw["target_parameters"] = fused
    raw.update(
        target_modules=union,
        modules_to_save=to_save or None,
        use_dora=False,
        lora_bias=False,
        use_rslora=False,
        layers_to_transform=None,
        layers_pattern=None,
    )
    return raw
