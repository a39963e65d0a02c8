"""`loratools info`: what an adapter is, from its config and header alone (no tensor is loaded)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..adapter import Adapter
from ..arch.experts import is_per_expert
from ..report import Report

# Fields of InfoReport that are the config's own, as parsed (AdapterConfig)
# MoE layouts: one LoRA per expert's Linear (transformers 4's modules, as checkpoints name them), or
# one LoRA on a fused experts parameter of all experts (transformers 5, PEFT's target_parameters).
PER_EXPERT, FUSED_EXPERTS = "per-expert (v4)", "fused experts (v5)"

_CONFIG_FIELDS = ("base_model_name_or_path", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "lora_bias",
                  "bias", "rank_pattern", "alpha_pattern", "target_modules")


@dataclass
class InfoReport(Report):
    """An adapter described from its config and header (the fields of `info --json`, in the README)."""

    adapter: str
    architecture: str | None
    architecture_note: str | None  # why it is unknown, or what is uncertain
    family_known: bool  # False: only module names were seen, shared by several families
    naming: str | None
    head: str | None
    peft_type: str  # ADALORA: described as the plain LoRA it equals (A⊙E, per-module scaling)
    pruned_modules: list[str]  # AdaLoRA modules pruned to rank 0
    base_model_name_or_path: str | None
    r: int
    lora_alpha: float
    scaling: float
    use_rslora: bool
    use_dora: bool
    fan_in_fan_out: bool
    lora_bias: bool
    bias: str
    rank_pattern: dict[str, Any]
    alpha_pattern: dict[str, Any]
    target_modules: Any  # list[str] | str (a regex) | None, as in the config
    roles: dict[str, int]
    num_modules: int
    trainable_parameters: int
    total_parameters: int
    dtypes: dict[str, int]
    file: dict[str, Any]
    modules: list[dict[str, Any]]
    experts: list[dict[str, Any]]  # LoRA on fused MoE expert parameters (target_parameters)
    extras: list[dict[str, Any]]
    trainable_tokens: list[dict[str, Any]]
    variants: list[str]
    refusals: dict[str, list[str]]
    unknown_keys: list[str]
    variant_keys: list[str]
    # With a base: base_report.base_summary(), and its "compare" rows with a 16-bit original.
    base: dict[str, Any] | None = None

    def _json(self) -> dict[str, Any]:
        doc = super()._json()
        if self.base is None:
            del doc["base"]  # no "base" key without a base
        return doc

    def render(self) -> str:
        text = [_adapter_text(self)]
        if self.base is not None:
            from .base_report import render_base, render_compare  # numpy: only for a base

            text.append(render_base(self.base))
            if "compare" in self.base:
                text.append(render_compare(self.base["compare"]))
        return "\n".join(text)


def adapter_info(adapter: Adapter) -> InfoReport:
    """The adapter described from its config and header alone."""
    cfg, det = adapter.config, adapter.detection
    modules = []
    for m in adapter.modules.values():
        modules.append(
            {
                "name": m.path,
                "role": m.role.value if m.role else None,
                "layer": m.layer,
                "layout": m.layout.value,
                "weight_shape": list(m.weight_shape),
                "rank": m.rank,
                "alpha": m.alpha,
                "scaling": m.scaling,
                "dora": m.magnitude_key is not None,
                "lora_bias": m.lora_bias_key is not None,
                "kasa": m.diag_key is not None,
                "moe": PER_EXPERT if is_per_expert(m.path) else None,
            }
        )
    experts = [
        {"name": e.path, "role": e.role.value if e.role else None, "layer": e.layer, "layout": FUSED_EXPERTS,
         "experts": e.num_experts, "rank": e.rank, "alpha": e.alpha, "scaling": e.scaling,
         "lora_A": list(adapter.tensors.meta(e.a_key).shape), "lora_B": list(adapter.tensors.meta(e.b_key).shape)}
        for e in sorted(adapter.experts.values(), key=lambda e: (e.layer if e.layer is not None else -1, e.path))
    ]
    metas = {key: adapter.tensors.meta(key) for key in adapter.tensors.keys()}
    lora_keys = set()
    for m in adapter.modules.values():
        lora_keys.update(k for k in (m.a_key, m.b_key, m.magnitude_key, m.lora_bias_key, m.diag_key) if k)
    lora_keys.update(k for e in adapter.experts.values() for k in (e.a_key, e.b_key))
    lora_keys.update(t.key for t in adapter.trainable_tokens)
    extra_kinds = {e.key: e.kind for e in adapter.extras}
    trainable = sum(
        meta.numel for key, meta in metas.items() if key in lora_keys or extra_kinds.get(key) in ("modules_to_save", "base_bias", "bias")
    )
    roles = Counter(m.role.value if m.role else "unknown" for m in adapter.modules.values())
    weights = adapter.weights_path
    return InfoReport(
        adapter=adapter.source,
        architecture=det.architecture,
        architecture_note=det.reason or None,
        family_known=det.family_known,
        naming=det.scheme,
        head=det.head,
        peft_type=adapter.origin,
        pruned_modules=list(adapter.pruned),
        **{name: getattr(cfg, name) for name in _CONFIG_FIELDS},
        scaling=cfg.default_scaling,
        roles=dict(sorted(roles.items())),
        num_modules=len(adapter.modules),
        trainable_parameters=trainable,
        total_parameters=sum(meta.numel for meta in metas.values()),
        dtypes=dict(sorted(Counter(meta.dtype for meta in metas.values()).items())),
        file={
            "path": weights,
            "format": "bin" if str(weights).endswith(".bin") else "safetensors",
            "bytes": os.path.getsize(weights) if weights and os.path.isfile(weights) else None,
        },
        modules=modules,
        experts=experts,
        extras=[
            {"key": e.key, "kind": e.kind, "replaces": e.target, "shape": list(metas[e.key].shape), "dtype": metas[e.key].dtype}
            for e in adapter.extras
        ],
        trainable_tokens=[{"module": t.path, "tokens": len(t.indices)} for t in adapter.trainable_tokens],
        variants=list(cfg.variants),
        refusals={"merge": cfg.refusals(merging=True),
                  "rewrite": cfg.refusals(merging=False) + [r for r in [adapter.conv_refusal("convert/combine/resize")] if r]},
        unknown_keys=list(adapter.unknown_keys),
        variant_keys=list(adapter.variant_keys),
    )


def _adapter_text(info: InfoReport) -> str:
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    arch = info.architecture or f"unknown ({info.architecture_note})"
    if info.head:
        arch += f", {info.head} head"
    lines = [
        f"adapter       {info.adapter}",
        f"architecture  {arch}",
        f"peft_type     {info.peft_type}   base: {info.base_model_name_or_path or '-'}",
        f"r / alpha     {info.r} / {_num(info.lora_alpha)}   scaling {_num(info.scaling)}"
        f"{'  (alpha/sqrt(r), rsLoRA)' if info.use_rslora else ''}",
        f"flags         rslora {yes(info.use_rslora)}, dora {yes(info.use_dora)}, "
        f"fan_in_fan_out {yes(info.fan_in_fan_out)}, lora_bias {yes(info.lora_bias)}, bias {info.bias}",
        f"targets       {_targets(info.target_modules)}",
        f"modules       {info.num_modules} ({', '.join(f'{r} {n}' for r, n in info.roles.items())})",
        f"parameters    {info.trainable_parameters:,} trainable, {info.total_parameters:,} in the file",
        f"dtypes        {', '.join(f'{d} x{n}' for d, n in info.dtypes.items())}",
        f"file          {info.file['path']} ({info.file['format']}, {_size(info.file['bytes'])})",
    ]
    for name in ("rank_pattern", "alpha_pattern"):
        if getattr(info, name):
            lines.append(f"{name:<13} {', '.join(f'{k!r}: {_num(v)}' for k, v in getattr(info, name).items())}")
    odd = [m for m in info.modules if (m["rank"], m["alpha"]) != (info.r, info.lora_alpha)]
    if odd:
        lines.append(f"modules whose r / alpha differ from the defaults ({len(odd)}):")
        lines += [f"  {m['name']:<48} r={m['rank']:<4} alpha={_num(m['alpha']):<6} scaling={_num(m['scaling'])}" for m in odd]
    if info.experts:
        first = info.experts[0]
        roles = Counter(e["role"] or e["name"].rsplit(".", 1)[1] for e in info.experts)
        lines.append(f"experts       {len(info.experts)} modules of {first['experts']} fused experts ({FUSED_EXPERTS}: "
                     f"{', '.join(f'{r} {n}' for r, n in sorted(roles.items()))}), rank {_ranks(info.experts)} per expert")
    per_expert = [m for m in info.modules if m["moe"]]
    if per_expert:
        lines.append(f"experts       {len(per_expert)} modules of single experts ({PER_EXPERT}), "
                     f"rank {_ranks(per_expert)}")
    if info.extras:
        lines.append(f"extra tensors ({len(info.extras)}):")
        lines += [f"  {e['kind']:<16} {e['replaces']:<48} {e['shape']} {e['dtype']}" for e in info.extras]
    if info.variants:
        lines.append(f"variants      {', '.join(info.variants)}")
    for t in info.trainable_tokens:
        lines.append(f"tokens        {t['tokens']} trainable token rows of {t['module']}")
    for op, reasons in (("merge", info.refusals["merge"]), ("convert/combine/resize", info.refusals["rewrite"])):
        if reasons:
            lines.append(f"refused by {op}: {reasons[0]}")
    if info.unknown_keys:
        lines.append(f"unrecognised keys ({len(info.unknown_keys)}; neither LoRA factors nor known extras):")
        lines += [f"  {k}" for k in info.unknown_keys[:20]]
        if len(info.unknown_keys) > 20:
            lines.append(f"  ... and {len(info.unknown_keys) - 20} more")
    return "\n".join(lines)


def _ranks(modules: list[dict[str, Any]]) -> str:
    ranks = sorted({m["rank"] for m in modules})
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"


def _num(x: float) -> str:
    return f"{x:.6g}"


def _targets(targets: Any) -> str:
    if targets is None:
        return "-"
    if isinstance(targets, str):
        return f"regex {targets!r}"
    return ", ".join(sorted(targets))


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
