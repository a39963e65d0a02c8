"""`loratools convert`: rename an adapter into another architecture's module scheme, exactly.

Every module is mapped to a canonical (layer, role); the target's table names it again. GPT-2's
fused c_attn is split by slicing the rows of B (A is shared), and joined by stacking the A's and
putting the B's block-diagonal, each scaled by its own s, so the fused module has scaling 1 and
rank r_q + r_k + r_v. PEFT stores lora_A (r, in) and lora_B (out, r) for Linear and Conv1D alike,
so ΔW in nn.Linear orientation (s·B@A) carries over without any transpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapter import BASE_PARTS, LORA_BIAS_PART, MAGNITUDE_PART, PREFIX, Adapter, factor_keys
from ..arch import CONVERT_SCHEMES, Architecture, Head, Layout, Role, get_architecture, locate
from ..config import with_module_ranks
from ..errors import ShapeError, UnsupportedError, UsageError
from ..report import Report

# Roles that exist across families and can be carried over.
CONVERTIBLE = {Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_OUT, Role.FFN_UP, Role.FFN_GATE, Role.FFN_DOWN, Role.TOKEN_EMBED}
QKV = (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V)


@dataclass
class Part:
    """One canonical module: ΔW = scaling·B@A in nn.Linear orientation, plus what follows it."""

    a: torch.Tensor
    b: torch.Tensor
    rank: int
    alpha: float
    scaling: float
    embedding: bool = False
    magnitude: torch.Tensor | None = None
    lora_bias: torch.Tensor | None = None
    base_bias: torch.Tensor | None = None
    base_weight: torch.Tensor | None = None  # a saved full embedding
    source: str = ""  # the source module path, for messages


@dataclass
class ConvertReport(Report):
    adapter: str
    out: str
    source_architecture: str
    target_architecture: str
    head: str
    modules: dict[str, list[str]] = field(default_factory=dict)  # target path -> source paths
    dropped: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"converted {self.source_architecture} -> {self.target_architecture} ({self.head}) into {self.out}: "
                 f"{len(self.modules)} modules"]
        if self.dropped:
            lines.append(f"dropped (no counterpart): {', '.join(self.dropped)}")
        return "\n".join(lines)


def convert_adapter(
    adapter: Adapter,
    to: str = CONVERT_SCHEMES[0],
    source: str | None = None,
    head: str | None = None,
    drop_unmapped: bool = False,
    base_model: str | None = None,
) -> tuple[Adapter, ConvertReport]:
    """The adapter renamed for architecture `to` (head `head`, default its first), with every
    canonical role's ΔW unchanged."""
    if adapter.experts:  # before the generic refusal: say why renaming cannot apply to them
        first = next(iter(adapter.experts))
        raise UnsupportedError(
            f"cannot convert {adapter.source or 'the adapter'} to {to} names: it has LoRA on fused MoE expert parameters "
            f"(target_parameters, e.g. {first}), and the {', '.join(CONVERT_SCHEMES)} naming schemes have no fused "
            "experts to rename them to (convert --to-lora, resize and combine keep them in PEFT's layout)",
            code="fused-experts")
    adapter.require_supported("convert")
    src_name = source or adapter.architecture
    if src_name is None:
        raise UsageError(f"cannot detect the adapter's architecture ({adapter.detection.reason}); pass --from")
    src, dst = get_architecture(src_name), get_architecture(to)
    for arch in (src, dst):
        if not arch.convertible:
            raise UnsupportedError(f"convert reads and writes the {', '.join(CONVERT_SCHEMES)} naming schemes; "
                                   f"{arch.name} ({arch.scheme} names) has modules it cannot split or join exactly")
    dst_head = dst.head(head) if head else dst.heads[0]
    prefix = _source_prefix(adapter, src)
    parts, unmapped = _canonical_parts(adapter, src, prefix)
    parts, fused_into = _to_target_layout(parts, dst, unmapped, adapter.config.use_rslora)
    if unmapped and not drop_unmapped:
        raise UnsupportedError(
            f"no {dst.name} counterpart for {len(unmapped)} module(s): {', '.join(unmapped)} (use --drop-unmapped to drop them)"
        )
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    report = ConvertReport(adapter.source, "", src.name, dst.name, dst_head.name, dropped=list(unmapped))
    for (layer, role), part in sorted(parts.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or 0, kv[0][1].value)):
        template = dst.template(role)
        path = ("" if template.in_head else dst_head.prefix) + template.path.format(layer=layer)
        key = PREFIX + path
        a_key, b_key = factor_keys(path, part.embedding)
        tensors[a_key], tensors[b_key] = part.a.contiguous(), part.b.contiguous()
        for suffix, tensor in (
            (MAGNITUDE_PART, part.magnitude),
            (LORA_BIAS_PART, part.lora_bias),
            (BASE_PARTS[0], part.base_bias),
            (BASE_PARTS[1], part.base_weight),
        ):
            if tensor is not None:
                tensors[f"{key}.{suffix}"] = tensor.contiguous()
        ranks[path] = (part.rank, part.alpha)
        report.modules[path] = fused_into.get((layer, role), [part.source])
    if not tensors:
        raise UnsupportedError("nothing left to convert: every module was unmapped")
    raw = _target_config(adapter, dst, dst_head, list(ranks), base_model)
    raw = with_module_ranks(raw, ranks, adapter.config.use_rslora)
    return Adapter.from_tensors(raw, tensors, source=adapter.source), report


def _source_prefix(adapter: Adapter, src: Architecture) -> str:
    if adapter.architecture == src.name and adapter.detection.prefix is not None:
        return adapter.detection.prefix
    # --from names another family than the detected one: use the prefix that matches the most modules
    best = max({h.prefix for h in src.heads}, key=lambda p: sum(locate(src, p, m) is not None for m in adapter.modules))
    return best


def _canonical_parts(adapter: Adapter, src: Architecture, prefix: str) -> tuple[dict, list[str]]:
    parts: dict[tuple[int | None, Role], Part] = {}
    unmapped: list[str] = []
    for path, module in adapter.modules.items():
        ref = locate(src, prefix, path)
        if ref is None or (ref.role not in CONVERTIBLE and ref.role is not Role.ATTN_QKV):
            unmapped.append(path)
            continue
        a, b = adapter.factors(path)
        get = lambda key: adapter.tensor(key) if key else None  # noqa: E731
        parts[(ref.layer, ref.role)] = Part(
            a=a, b=b, rank=module.rank, alpha=module.alpha, scaling=module.scaling, embedding=module.embedding,
            magnitude=get(module.magnitude_key), lora_bias=get(module.lora_bias_key),
            base_bias=get(module.base_bias_key), base_weight=get(module.base_weight_key), source=path,
        )
    moved = {m.base_bias_key for m in adapter.modules.values()} | {m.base_weight_key for m in adapter.modules.values()}
    unmapped += [e.key[len(PREFIX):] for e in adapter.extras if e.key not in moved]  # modules_to_save and the like
    return parts, unmapped


def _to_target_layout(parts: dict, dst: Architecture, unmapped: list[str], use_rslora: bool) -> tuple[dict, dict]:
    """Split fused modules the target lacks, join the ones it fuses; roles it lacks go to unmapped."""
    fused_into: dict[tuple, list[str]] = {}
    out: dict[tuple, Part] = {}
    for (layer, role), part in parts.items():
        if role is Role.ATTN_QKV and dst.template(Role.ATTN_QKV) is None:
            for sub_role, sub in zip(QKV, _split(part, 3)):
                out[(layer, sub_role)] = sub
        else:
            out[(layer, role)] = part
    if dst.template(Role.ATTN_QKV) is not None:
        for layer in sorted({layer for (layer, role) in out if role in QKV}, key=lambda x: (x is None, x or 0)):
            pieces = [out.pop((layer, r), None) for r in QKV]
            out[(layer, Role.ATTN_QKV)] = _join(pieces, layer, use_rslora)
            fused_into[(layer, Role.ATTN_QKV)] = [p.source for p in pieces if p is not None]
    for (layer, role) in list(out):
        if dst.template(role) is None:
            unmapped.append(out.pop((layer, role)).source)
    return out, fused_into


def _split(part: Part, n: int) -> list[Part]:
    rows = part.b.shape[0]
    if rows % n:
        raise ShapeError(f"module {part.source}: fused output of {rows} rows does not split into {n} equal parts")
    d = rows // n
    sl = lambda t, i: None if t is None else t[i * d : (i + 1) * d]  # noqa: E731
    return [
        Part(a=part.a, b=part.b[i * d : (i + 1) * d], rank=part.rank, alpha=part.alpha, scaling=part.scaling,
             magnitude=sl(part.magnitude, i), lora_bias=sl(part.lora_bias, i), base_bias=sl(part.base_bias, i),
             source=part.source)
        for i in range(n)
    ]


def _join(pieces: list[Part | None], layer, use_rslora: bool) -> Part:
    """q, k, v (some possibly None) -> one fused module with scaling 1: A stacked, B block-diagonal."""
    present = [p for p in pieces if p is not None]
    first = present[0]
    d, width = first.b.shape[0], first.a.shape[1]
    for p in present:
        if p.b.shape[0] != d or p.a.shape[1] != width:
            shapes = ", ".join(f"{q.source} out={q.b.shape[0]} in={q.a.shape[1]}" for q in present)
            raise ShapeError(f"layer {layer}: cannot fuse q, k, v into one module, their shapes differ ({shapes}); "
                             "grouped-query attention has no GPT-2 counterpart")
    dtype = torch.promote_types(first.a.dtype, first.b.dtype)
    rank = sum(p.rank for p in present)
    a = torch.cat([p.a.to(dtype) for p in present], dim=0)
    b = torch.zeros(3 * d, rank, dtype=torch.float32)
    col = 0
    for i, p in enumerate(pieces):
        if p is not None:
            # fold each piece's own scaling into its block, in float32, then store in the factors' dtype
            b[i * d : (i + 1) * d, col : col + p.rank] = p.b.float() * p.scaling
            col += p.rank

    def stacked(attr: str, fill_zero: bool):
        values = [getattr(p, attr) if p is not None else None for p in pieces]
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            if not fill_zero:
                missing = [r.value for r, v in zip(QKV, values) if v is None]
                raise UnsupportedError(
                    f"layer {layer}: {attr} of {', '.join(missing)} would be needed to fuse q, k, v (it depends on the base weights)"
                )
            like = next(v for v in values if v is not None)
            values = [v if v is not None else torch.zeros(d, dtype=like.dtype) for v in values]
        return torch.cat(values)

    alpha = float(rank) ** 0.5 if use_rslora else rank  # scaling alpha/r (or alpha/√r) = 1
    return Part(
        a=a, b=b.to(dtype), rank=rank, alpha=alpha, scaling=1.0,
        magnitude=stacked("magnitude", fill_zero=False),
        lora_bias=_fold_bias(pieces, d),
        base_bias=stacked("base_bias", fill_zero=False),
        source=", ".join(p.source for p in present),
    )


def _fold_bias(pieces: list[Part | None], d: int) -> torch.Tensor | None:
    """lora_B.bias adds s·bias; the fused module has s = 1, so fold each piece's s in (zeros where absent)."""
    biases = [p.lora_bias * p.scaling if p is not None and p.lora_bias is not None else None for p in pieces]
    if all(b is None for b in biases):
        return None
    like = next(b for b in biases if b is not None)
    return torch.cat([b if b is not None else torch.zeros(d, dtype=like.dtype) for b in biases])


def _target_config(adapter: Adapter, dst: Architecture, head: Head, paths: list[str], base_model: str | None) -> dict[str, Any]:
    raw = dict(adapter.config.raw)
    raw.update(
        target_modules=sorted(paths),  # exact paths: a leaf name like c_proj would also catch mlp.c_proj
        fan_in_fan_out=any(t.layout is Layout.CONV1D for t in dst.modules),
        base_model_name_or_path=base_model,
        modules_to_save=None,
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        # The target's model class, as PEFT records it: evidence of the family where module names
        # are shared (GPT-2's are also StarCoder's, stored transposed).
        auto_mapping={"base_model_class": head.classes[0], "parent_library": "transformers"} if head.classes else None,
    )
    return raw
