"""The arithmetic of a merge: one base tensor after the plan's ops, as PEFT's merge_and_unload
computes it (W + s·B@A in float32, DoRA's renormalisation, KaSA's truncation, replaced rows).

The base tensor may be a view of a read-only memory map: nothing here writes into it; every
in-place step works on a copy. Results go to an `out` object whose `store(value)` takes the
tensor's rows in order (whole, or block after block) and rounds them into the output dtype.
"""

from __future__ import annotations

import torch

from ..arch import Layout
from .merge_plan import MergePlan, TensorOps

ROW_BLOCK_BYTES = 1 << 20  # float32 rows processed per step on CPU: small enough to stay in cache


def apply_ops(plan: MergePlan, ops: TensorOps, base: torch.Tensor, out, dev: torch.device) -> None:
    """Store into `out` the base tensor after the plan's ops."""
    adapter = plan.adapter
    if ops.replace_key is not None:
        # PEFT loads a saved tensor into the existing parameter, i.e. in the base's dtype.
        base = adapter.tensor(ops.replace_key).to(base.dtype)
    if ops.rows:
        base = base.clone()
        for tokens in ops.rows:  # PEFT: index_copy of the trained rows, cast to the base dtype
            base[list(tokens.indices)] = adapter.tensor(tokens.key).to(device=base.device, dtype=base.dtype)
    if not (ops.modules or ops.lora_biases):
        out.store(base)
        return
    low_rank = []  # (L, R, s): ΔW = s·L@R in the base tensor's own orientation
    for module in ops.modules:
        a, b = (t.to(device=dev, dtype=torch.float32) for t in adapter.factors(module.path))
        s = module.scaling * plan.scale
        if module.diag_key is not None:
            diag = adapter.tensor(module.diag_key).to(device=dev, dtype=torch.float32)
            out.store(_kasa(_working_copy(base, dev), a, b * diag, s))
            return
        if module.magnitude_key is not None:
            magnitude = adapter.tensor(module.magnitude_key).to(device=dev, dtype=torch.float32)
            out.store(_dora(_working_copy(base, dev), a, b, s, magnitude, module.layout))
            return
        # Conv1D (in, out) and Embedding (num, dim) hold ΔW transposed: (B@A).T = A.T @ B.T
        low_rank.append((b, a, s) if module.layout is Layout.LINEAR else (a.T.contiguous(), b.T.contiguous(), s))
    if base.dim() == 1:  # a bias: lora_bias adds s·lora_B.bias
        w = _working_copy(base, dev)
        for module in ops.lora_biases:
            w.add_(adapter.tensor(module.lora_bias_key).to(device=dev, dtype=torch.float32), alpha=module.scaling * plan.scale)
        out.store(w)
        return
    if dev.type != "cpu":
        w = _working_copy(base, dev)
        for left, right, s in low_rank:
            w.addmm_(left, right, alpha=s)
        out.store(w)
        return
    # CPU: row blocks, so the float32 working copy stays in cache and each byte of the base is
    # read and written once. Same arithmetic: W + s·L@R in float32, rounded once into `out`.
    # The block is one reused buffer: a fresh allocation per block would be returned to the OS and
    # page-faulted in again every time, which costs more than the arithmetic.
    rows_per_block = max(1, ROW_BLOCK_BYTES // (4 * max(1, base.shape[1])))
    workspace = torch.empty((rows_per_block, base.shape[1]), dtype=torch.float32)
    for start in range(0, base.shape[0], rows_per_block):
        stop = min(start + rows_per_block, base.shape[0])
        block = workspace[: stop - start]
        block.copy_(base[start:stop])
        for left, right, s in low_rank:
            block.addmm_(left[start:stop], right, alpha=s)
        out.store(block)


def _working_copy(base: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A float32 copy on the device that may be changed in place (the base may be a read-only map)."""
    return base.to(device=dev, dtype=torch.float32, copy=True)


def _kasa(w: torch.Tensor, a: torch.Tensor, b_diag: torch.Tensor, s: float) -> torch.Tensor:
    """PEFT's KaSA: the base loses its r smallest singular components, then ΔW = s·(B·diag(d))·A."""
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    keep = min(w.shape) - a.shape[0]
    truncated = (u[:, :keep] * sv[:keep]) @ vh[:keep]
    return truncated.addmm_(b_diag, a, alpha=s)


def _dora(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, magnitude: torch.Tensor, layout: Layout) -> torch.Tensor:
    """W' = m / ‖W + ΔW‖_row · (W + ΔW), the norm taken per output row of the (out, in) view."""
    view = w if layout is Layout.LINEAR else w.T
    view = view.addmm(b, a, alpha=s)
    view.mul_((magnitude / torch.linalg.norm(view, dim=1)).unsqueeze(1))
    return view if layout is Layout.LINEAR else view.T
