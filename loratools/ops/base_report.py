"""What a base checkpoint is (for `info --base` and `validate --base`), and for a quantized base
the question QLoRA users ask before merging into the 16-bit original instead: how large is the
base's quantization error next to the adapter's ΔW? (`info --base Q --compare-base W16`.)

    ratio = ‖W16 − dq(Wq)‖ / ‖ΔW‖   per module, Frobenius norms, ΔW = s·B·A

Well below 1: the adapter's change dominates and merging into W16 keeps it. Near or above 1:
the adapter was trained against the quantization error too; merge into the quantized base
(what `loratools merge` on it writes) to get the model that was trained. No torch: ‖ΔW‖ comes
from the factors (‖s·B·A‖² = s²·Σ (BᵀB)⊙(AAᵀ)), the weights are read one at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..adapter import Adapter
from ..arch import Role
from ..errors import ShapeError
from ..formats.checkpoint import Checkpoint
from . import dequant
from .basemap import BaseNameMapper, adapter_for_base


def base_summary(base: Checkpoint) -> dict[str, Any]:
    return {
        "path": str(base.path),
        "shards": len(base.shards),
        # an MXFP4 weight is stored only as its parts
        "tensors": len(base.weight_map) - len(base.quant_parts) + sum(w.stored != w.name for w in base.quantized.values()),
        "quantization": base.describe_quantization(),
        "quantized_weights": len(base.quantized),
    }


def render_base(summary: dict[str, Any]) -> str:
    kind = f"quantized base ({summary['quantization']}), {summary['quantized_weights']} quantized weights" \
        if summary["quantization"] else "not quantized"
    line = f"base {summary['path']}: {summary['tensors']} tensors in {summary['shards']} shard(s), {kind}"
    return line + (f"\n{vocabulary_line(summary['vocabulary'])}" if summary.get("vocabulary") else "")


def vocabulary_line(change: dict[str, int]) -> str:
    """An adapter trained with added tokens (ops/merge/vocab.py), for info and validate."""
    n, m = change["base"], change["adapter"]
    return (f"vocabulary {'grows' if m > n else 'shrinks'} from {n} to {m} tokens (the adapter saves the resized embedding "
            f"and head): merge writes them with {m} rows and vocab_size {m} in config.json")


def compare_bases(adapter: Adapter, quantized: Checkpoint, reference: Checkpoint) -> list[dict[str, Any]]:
    """Per adapter module: the quantization error of its base weight next to its ΔW."""
    adapter = adapter_for_base(quantized, adapter)
    in_quantized, in_reference = BaseNameMapper(quantized, adapter), BaseNameMapper(reference, adapter)
    rows = []
    for module in adapter.modules.values():
        lm_head = module.role is Role.LM_HEAD
        q_name = in_quantized.find(f"{module.path}.weight", f"module {module.path}", lm_head=lm_head)
        r_name = in_reference.find(f"{module.path}.weight", f"module {module.path} in --compare-base", lm_head=lm_head)
        if quantized.info(q_name).shape != reference.info(r_name).shape:
            raise ShapeError(f"{q_name} is {list(quantized.info(q_name).shape)} in the base but "
                             f"{list(reference.info(r_name).shape)} in --compare-base: not the same model", code="base-shape")
        error = float(np.linalg.norm((dequant.read_float32(reference, r_name) - dequant.read_float32(quantized, q_name)).ravel()))
        delta = _delta_norm(adapter, module)
        rows.append({
            "module": module.path,
            "base_tensor": q_name,
            "quant_error": error,
            "delta_norm": delta,
            "quant_error_over_delta": error / delta if delta > 0 else None,
        })
    return rows


def render_compare(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'module':<48} {'‖W16−dq(W)‖/‖ΔW‖':>18} {'‖W16−dq(W)‖':>12} {'‖ΔW‖':>10}"]
    for r in rows:
        ratio = "-" if r["quant_error_over_delta"] is None else f"{r['quant_error_over_delta']:.3g}"
        lines.append(f"{r['module']:<48} {ratio:>18} {r['quant_error']:>12.4g} {r['delta_norm']:>10.4g}")
    ratios = sorted(r["quant_error_over_delta"] for r in rows if r["quant_error_over_delta"] is not None)
    if ratios:
        median = ratios[len(ratios) // 2]
        advice = ("the adapter's change dominates: merging into the 16-bit base keeps it" if ratios[-1] < 0.5 else
                  "the quantization error is as large as the adapter's change: merge into the quantized base "
                  "(the model that was trained), or check the 16-bit merge's outputs")
        lines.append(f"median ratio {median:.3g}, largest {ratios[-1]:.3g}: {advice}")
    return "\n".join(lines)


def _delta_norm(adapter: Adapter, module) -> float:
    a, b = (x.astype(np.float64) for x in adapter.factor_arrays(module.path))
    # ‖BA‖²_F = tr(AᵀBᵀBA) = Σ (BᵀB) ⊙ (AAᵀ): r×r products, never the full ΔW
    square = float(np.sum((b.T @ b) * (a @ a.T)))
    return abs(module.scaling) * float(np.sqrt(max(square, 0.0)))
