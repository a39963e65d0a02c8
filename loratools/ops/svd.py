"""`loratools svd`: how much of its rank each module's ΔW really uses."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

from ..adapter import Adapter
from ..report import Report
from .lowrank import effective_rank, energy_rank, stable_rank  # noqa: F401  (svd's measures, public here too)

DEFAULT_THRESHOLDS = (0.9, 0.99)


def threshold_key(t: float) -> str:
    return f"{t:g}"


def module_spectra(adapter: Adapter, paths: Iterable[str] | None = None) -> dict[str, list[float]]:
    """Singular values (descending, length r) of s·B·A for each module, never forming ΔW."""
    from .lowrank import factored_svd, padded

    out = {}
    for path in paths or adapter.modules:
        module = adapter.module(path)
        a, b = adapter.factor_arrays(path)
        out[path] = padded(factored_svd(b, a, module.scaling, name=path).s, module.rank)
    return out


@dataclass
class SvdReport(Report):
    adapter: str
    architecture: str | None
    dora: bool  # a DoRA adapter: the spectra are of its LoRA part s·B·A
    thresholds: list[str]  # the energy levels, as the keys of energy_rank
    modules: list[dict[str, Any]]  # per module: name, role, layer, shape, rank, scaling, singular values, ranks
    summary: dict[str, Any]  # overall, by_role, by_layer, verdict

    def render(self) -> str:
        keys = self.thresholds
        head = f"{'module':<44} {'role':<11} {'layer':>5} {'shape':>12} {'r':>4} {'sigma1':>10} {'eff.rank':>8} {'stable':>7}"
        head += "".join(f" {'k@' + k:>7}" for k in keys)
        lines = [head]
        for m in self.modules:
            shape = "x".join(map(str, m["shape"]))
            layer = "-" if m["layer"] is None else str(m["layer"])
            row = (
                f"{m['name'][-44:]:<44} {m['role'] or '?':<11} {layer:>5} {shape:>12} {m['rank']:>4} "
                f"{m['singular_values'][0]:>10.4g} {m['effective_rank']:>8.2f} {m['stable_rank']:>7.2f}"
            )
            lines.append(row + "".join(f" {m['energy_rank'][k]:>7}" for k in keys))
        for title, groups in (("role", self.summary["by_role"]), ("layer", self.summary["by_layer"])):
            lines.append("")
            lines.append(f"{'by ' + title:<20} {'modules':>7} {'r':>6} {'eff.rank':>8} {'stable':>7}" + "".join(f" {'k@' + k:>7}" for k in keys))
            for name, g in groups.items():
                lines.append(
                    f"{name:<20} {g['modules']:>7} {_fmt_rank(g['rank']):>6} {g['effective_rank']:>8.2f} {g['stable_rank']:>7.2f}"
                    + "".join(f" {g['energy_rank'][k]:>7.1f}" for k in keys)
                )
        lines.append("")
        if self.dora:
            lines.append("note: DoRA adapter: these are the spectra of the LoRA part s·B·A; the magnitude vectors are not analysed")
        lines.append(self.summary["verdict"])
        return "\n".join(lines)


def svd_report(adapter: Adapter, thresholds: Iterable[float] = DEFAULT_THRESHOLDS) -> SvdReport:
    """Every module's spectrum and the ranks derived from it (the `svd --json` schema in the README)."""
    thresholds = tuple(thresholds)
    adapter.require_supported("analyse", analysis=True)
    spectra = module_spectra(adapter, [*adapter.modules, *_expert_views(adapter)])
    modules = []
    for path, sigma in spectra.items():
        m = adapter.module(path)
        modules.append(
            {
                "name": path,
                "expert": m.expert.expert if m.expert else None,
                "role": m.role.value if m.role else None,
                "layer": m.layer,
                "shape": list(m.weight_shape),
                "rank": m.rank,
                "scaling": m.scaling,
                "dora": m.magnitude_key is not None,
                "singular_values": sigma,
                "effective_rank": effective_rank(sigma),
                "stable_rank": stable_rank(sigma),
                "energy_rank": {threshold_key(t): energy_rank(sigma, t) for t in thresholds},
            }
        )
    return SvdReport(
        adapter=adapter.source,
        architecture=adapter.architecture,
        dora=any(m["dora"] for m in modules),
        thresholds=[threshold_key(t) for t in thresholds],
        modules=modules,
        summary=_summary(modules, thresholds),
    )


def _expert_views(adapter: Adapter) -> list[str]:
    """One module per expert of every fused-experts module: ΔW_e = s·B_e·A_e, its spectrum the same
    in either orientation (named `<parameter>[e]`; the by-role summary is then over experts)."""
    return [adapter.expert_slice(expert, e, (0, expert.out_features), transposed=False).path
            for expert in adapter.experts.values() for e in range(expert.num_experts)]


def _group_stats(group: list[dict], thresholds: tuple[float, ...]) -> dict[str, Any]:
    n = len(group)
    return {
        "modules": n,
        "rank": _mean(m["rank"] for m in group),
        "effective_rank": _mean(m["effective_rank"] for m in group),
        "stable_rank": _mean(m["stable_rank"] for m in group),
        "energy_rank": {threshold_key(t): _mean(m["energy_rank"][threshold_key(t)] for m in group) for t in thresholds},
    }


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _summary(modules: list[dict], thresholds: tuple[float, ...]) -> dict[str, Any]:
    by_role: dict[str, list[dict]] = defaultdict(list)
    by_layer: dict[str, list[dict]] = defaultdict(list)
    for m in modules:
        by_role[m["role"] or "unknown"].append(m)
        by_layer["none" if m["layer"] is None else str(m["layer"])].append(m)
    layer_order = sorted(by_layer, key=lambda k: (k == "none", int(k) if k.isdigit() else 0))
    summary = {
        "overall": _group_stats(modules, thresholds) if modules else None,
        "by_role": {role: _group_stats(ms, thresholds) for role, ms in sorted(by_role.items())},
        "by_layer": {layer: _group_stats(by_layer[layer], thresholds) for layer in layer_order},
    }
    summary["verdict"] = _verdict(summary, thresholds)
    return summary


def _verdict(summary: dict, thresholds: tuple[float, ...]) -> str:
    if not summary["overall"]:
        return "the adapter has no LoRA modules"
    t = threshold_key(thresholds[0])
    overall = summary["overall"]
    line = f"{float(t):.0%} of the energy of ΔW needs {overall['energy_rank'][t]:.1f} of r={_fmt_rank(overall['rank'])} on average"
    roles = summary["by_role"]
    if len(roles) > 1:
        role, stats = min(roles.items(), key=lambda kv: kv[1]["energy_rank"][t] / max(kv[1]["rank"], 1))
        line += f"; {role} uses the least: {stats['energy_rank'][t]:.1f} of r={_fmt_rank(stats['rank'])}"
    return line


def _fmt_rank(r: float) -> str:
    return f"{r:.0f}" if float(r).is_integer() else f"{r:.1f}"


def plot_spectra(report: SvdReport, path: str, force: bool = False) -> None:
    """Normalised spectra (σ_i/σ_1) per role, mean over that role's modules, on a log scale."""
    from ..errors import UnsupportedError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UnsupportedError("--plot needs matplotlib: pip install 'loratools[plot]'") from None
    by_role: dict[str, list[list[float]]] = defaultdict(list)
    for m in report.modules:
        s1 = m["singular_values"][0]
        if s1 > 0:
            by_role[m["role"] or "unknown"].append([x / s1 for x in m["singular_values"]])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for role, spectra in sorted(by_role.items()):
        length = max(len(s) for s in spectra)
        mean = [_mean(s[i] for s in spectra if i < len(s)) for i in range(length)]
        ax.plot(range(1, length + 1), mean, marker="o", markersize=3, label=f"{role} ({len(spectra)})")
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("σ_i / σ_1 (mean over modules)")
    ax.set_title(f"ΔW spectra by role: {report.adapter}")
    ax.legend(fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    from ..formats.atomic import atomic_file

    with atomic_file(path, force=force) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
