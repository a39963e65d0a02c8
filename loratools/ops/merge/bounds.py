"""Whether a merged tensor can fail to be finite, decided by the plan before anything is written.

merge computes W + Σ s·B@A in float32 (float64 for a float64 base; DoRA: m·(W + ΔW)/‖W + ΔW‖ per row of the (out, in) view;
KaSA: W without its r smallest singular components, plus s·B·diag(d)·A; lora_bias: b + s·bias;
saved tensors and trainable tokens: cast into the base's dtype), rounds the result once into the
output dtype and refuses it if it is not finite (kernel_numpy, kernel_torch). `require_finite_merge`
makes that refusal part of the plan, which `validate --base` runs too: validate reports exactly
what merge refuses, with the same code (`merge-overflow`) and message.

Each changed tensor is bounded in float64 from the adapter's factors (which are small):

    |ΔW_ij| ≤ Σ_k |s·B_ik·A_kj| ≤ |s|·‖B_i,:‖·‖A_:,j‖          (Cauchy–Schwarz)

which bounds every partial sum of the float32 product as well, in any summation order (a GPU's
too), so a factor 1 + (r+3)·2⁻²³ covers its rounding. A convolution's weight is bounded as its
(out, in·Πkernel) matrix view, where ΔW = s·B·A of the factors' matrix views (Adapter.factor_arrays):
each element is the same r-term sum that PEFT's B⊛A computes. A tensor is settled by the first of:

1. headers: |W| at most the largest value of its dtype (a quantized weight: its largest code
   times its largest scale, from its small scale tensors). Every plain LoRA module settles here
   unless |ΔW| may exceed about 1e31 (float32 base), 6.6e35 (bfloat16) or 16 (float16: 65504
   is finite, 65520 is not) — or the output dtype is narrower than the base's (--dtype), or the
   base is float64 (merged in float64, whose largest value leaves no room above it here);
2. the base tensor read: |W| exactly, plus the row norms of W for DoRA (a norm near 0 makes
   m/‖W + ΔW‖ overflow) and ‖W‖_F for KaSA (it bounds the truncated W): DoRA and KaSA modules
   always come here;
3. merge's own arithmetic on that one tensor (shard.py, on the CPU), into a discarded output,
   only when even the exact |W| leaves the bound within reach of the limit: factors of ~1e15 and
   more, or |W| + |ΔW| near 65504 on a float16 base. Its failure is merge's own refusal.

Real adapters (factors ~1e-2..1e1, |ΔW| ≲ 1e3) settle in step 1 (step 2 on some float16 bases,
and for DoRA/KaSA), and no adapter is refused that merge would merge.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ...arch import Layout
from ...errors import LoraToolsError
from .. import dequant, dequant_mxfp4

if TYPE_CHECKING:
    from .plan import MergePlan, TensorOps

# dtype code -> (significand bits p, exponent of the largest binade): largest = (2 - 2^(1-p))·2^e
FORMATS = {"BF16": (8, 127), "F16": (11, 15), "F32": (24, 127), "F64": (53, 1023)}
NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_NUMPY = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}  # as held (bf16: its bits)
# A computed row norm at least this large has not lost its squares to float32 underflow.
TINY_NORM = 2.0**-40
ROW_BLOCK = 1 << 16  # base values widened to float64 per step when reading statistics


def largest(dtype: str) -> float:
    p, e = FORMATS[dtype]
    return math.ldexp(2 - 2.0 ** (1 - p), e)


def overflows_at(dtype: str) -> float:
    """The smallest magnitude that rounds to ±Inf in `dtype` (float64: its largest value,
    which is less, so comparisons with it stay conservative)."""
    if dtype == "F64":
        return largest(dtype)
    p, e = FORMATS[dtype]
    return math.ldexp(2 - 2.0**-p, e)


def unit(dtype: str) -> float:
    """Unit roundoff: the relative error of one rounding to nearest."""
    return 2.0 ** -FORMATS[dtype][0]


def limit(out: str, compute: str) -> float:
    """A value computed in `compute` and rounded into `out` is finite when its exact magnitude
    is below this."""
    if overflows_at(out) >= overflows_at(compute):
        return overflows_at(compute)
    # the largest `compute` value that still rounds to a finite `out` value, or a little less
    return overflows_at(out) * (1 - 4 * unit(compute))


def compute_dtype(held: str) -> str:
    """The dtype merge adds ΔW in (kernel_torch.compute_dtype, kernel_numpy): float64 for a float64
    base, float32 for every other."""
    return "F64" if held == "F64" else "F32"


@dataclass
class Update:
    """One additive term of a tensor's merge (a module's s·ΔW, or s·lora_B.bias), bounded."""

    module: str
    entry: float  # ≥ |every computed element|, rounding included
    inner: float  # ≥ every intermediate of computing it (s, s·B, partial sums of B@A)
    rows: tuple[np.ndarray, np.ndarray] | None = None  # ≤ ‖s·ΔW_i,:‖ ≤, each row i of the (out, in) view


@dataclass
class Start:
    """What the merge starts from: the base tensor (or what replaces it) before the updates."""

    largest: float  # ≥ max|W|
    exact: bool  # read from the data, not the dtype
    row_norms: np.ndarray | None = None  # DoRA: ‖W_i,:‖ of the (out, in) view (float64, to 1e-12)
    frobenius: float | None = None  # KaSA: ‖W‖_F


def require_finite_merge(plan: "MergePlan") -> "MergePlan":
    """Raise merge's own refusal (code merge-overflow) for the first changed tensor whose merged
    value would not be finite in its output dtype; return the plan."""
    experts = _ExpertNorms()
    for name, ops in plan.ops.items():
        _check_tensor(plan, name, ops, experts)
    return plan


def _check_tensor(plan: "MergePlan", name: str, ops: "TensorOps", experts: "_ExpertNorms") -> None:
    held, out = _dtypes(plan, name)
    if held not in FORMATS or out not in FORMATS:
        return  # not a float tensor: nothing merge adds to it
    compute = compute_dtype(held)
    updates = [_low_rank(plan, m, compute, experts) for m in ops.modules] + [_bias(plan, m, compute) for m in ops.lora_biases]
    start = _start(plan, name, ops, held, read=any(m.magnitude_key or m.diag_key for m in ops.modules))  # norms of W
    if _settled(plan, name, ops, updates, start, held, out, compute):
        return
    if not start.exact:
        start = _start(plan, name, ops, held, read=True)
        if _settled(plan, name, ops, updates, start, held, out, compute):
            return
    failure = _merge_exactly(plan, name, ops, held, out)
    if failure is not None:
        raise LoraToolsError(_message(plan, name, ops, updates, start, out, held), code="merge-overflow") from failure


def _dtypes(plan: "MergePlan", name: str) -> tuple[str, str]:
    """(the dtype shard.py holds the base tensor in, the dtype it rounds the result into)."""
    base = plan.base
    weight = base.quantized.get(name)
    if weight is not None:  # dequantized; with keep_quantized merged in float32, then quantized again
        return dequant.value_dtype(weight), "F32" if plan.keep_quantized else plan.out_dtype or base.info(name).dtype
    held = base.info(name).dtype
    return held, plan.out_dtype or held


# ---- bounds from the adapter -------------------------------------------------------------------


def _low_rank(plan: "MergePlan", module, compute: str, experts: "_ExpertNorms") -> Update:
    s = abs(module.scaling * plan.scale)
    if module.expert:  # a slice of fused experts (never DoRA or KaSA): its norms cut from the module's
        b_max, a_max = experts.largest(plan.adapter, module)
        error = (module.rank + 3) * 2 * unit(compute)  # as below
        return Update(module.path, s * b_max * a_max * (1 + error), max(s, 1) * max(b_max, 1) * max(a_max, 1) * (1 + error))
    a, b = plan.adapter.factor_arrays(module.path)
    if module.diag_key:  # KaSA: B·diag(d), computed first
        b = _float64(b) * _float64(plan.adapter.tensors.array(module.diag_key))
    error = (a.shape[0] + 3) * 2 * unit(compute)  # of each computed element, relative to Σ_k |s·B_ik·A_kj|
    with np.errstate(all="ignore"):  # an Inf or NaN bound is inconclusive, never an error here
        b_rows = np.sqrt(np.sum(np.square(b, dtype=np.float64), axis=1))  # ‖B_i,:‖: rows of the (out, in) view
        a_cols = np.sqrt(np.sum(np.square(a, dtype=np.float64), axis=0))  # ‖A_:,j‖
        b_max, a_max = _max(b_rows), _max(a_cols)
        update = Update(module.path, s * b_max * a_max * (1 + error), max(s, 1) * max(b_max, 1) * max(a_max, 1) * (1 + error))
        if module.magnitude_key:  # DoRA: the norm of every row of ΔW
            # ‖(B@A)_i,:‖² = B_i·(A·Aᵀ)·B_iᵀ (an r×r Gram matrix), plus the float32 rounding of each
            # element and the float64 rounding of this sum (each below error·‖B_i‖·‖A‖_F)
            a, b = _float64(a), _float64(b)
            norms = np.sqrt(np.maximum(np.sum((b @ (a @ a.T)) * b, axis=1), 0))
            slack = 2 * error * b_rows * math.sqrt(float(np.sum(a_cols * a_cols)))
            update.rows = (s * (norms - slack) * (1 - 2.0**-40), s * (norms + slack) * (1 + 2.0**-40))
    return update


class _ExpertNorms:
    """‖B_e,i‖ and ‖A_e,:j‖ of every expert of a fused-experts module at once (two numpy
    reductions, not two per slice: a layer of 64 experts has 192 slices), for its last two
    modules (a shard interleaves gate_up's and down's slices, expert by expert)."""

    def __init__(self):
        self.norms: OrderedDict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def largest(self, adapter, module) -> tuple[float, float]:
        """(max ‖B_e,i‖ over the slice's rows i, max ‖A_e,:j‖ over its columns j) of expert slice `module`."""
        cut, key = module.expert, (module.a_key, module.b_key)
        if key not in self.norms:
            a, b = adapter.fused_factors(module)  # A (r·E, in), B by expert (out, E, r)
            with np.errstate(all="ignore"):  # an Inf or NaN bound is inconclusive, never an error here
                a = np.square(a, dtype=np.float64).reshape(cut.num_experts, cut.rank, a.shape[-1])
                self.norms[key] = np.sqrt(np.sum(np.square(b, dtype=np.float64), axis=2)).T, np.sqrt(np.sum(a, axis=1))
            while len(self.norms) > 2:
                self.norms.popitem(last=False)
        b_rows, a_cols = (x[cut.expert] for x in self.norms[key])
        if cut.b_rows:
            b_rows = b_rows[cut.b_rows[0]: cut.b_rows[1]]
        if cut.a_cols:
            a_cols = a_cols[cut.a_cols[0]: cut.a_cols[1]]
        return _max(b_rows), _max(a_cols)


def _bias(plan: "MergePlan", module, compute: str) -> Update:
    s, largest_bias = abs(module.scaling * plan.scale), _max(np.abs(_float64(plan.adapter.tensors.array(module.lora_bias_key))))
    grow = 1 + 4 * unit(compute)
    return Update(module.path, s * largest_bias * grow, max(s, 1) * max(largest_bias, 1) * grow)


def _max(x: np.ndarray) -> float:
    return float(np.max(x)) if x.size else 0.0


def _float64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# ---- what the merge starts from ------------------------------------------------------------------


def _start(plan: "MergePlan", name: str, ops: "TensorOps", held: str, read: bool) -> Start:
    """Bounds of the tensor the updates are added to: the base (from its dtype, or `read`),
    or the adapter tensor replacing it, or the base with trainable-token rows replaced; all as
    cast into the dtype the base is held in."""
    wants_rows = any(m.magnitude_key for m in ops.modules)
    wants_frobenius = any(m.diag_key for m in ops.modules)
    layout = ops.modules[0].layout if ops.modules else Layout.LINEAR
    if ops.replace_key is not None:
        values = plan.adapter.tensors.array(ops.replace_key)
        return _rounded_into(_statistics(_row_blocks(values, None), layout, wants_rows, wants_frobenius), held)
    if read:
        start = _statistics(_row_blocks(_held_values(plan, name, held), held), layout, wants_rows, wants_frobenius)
    else:
        start = Start(_header_bound(plan, name, held), exact=False)
    for tokens in ops.rows:  # PEFT's index_copy, in the base's dtype
        rows = _rounded_into(Start(_max(np.abs(_float64(plan.adapter.tensors.array(tokens.key)))), True), held)
        start.largest = max(start.largest, rows.largest)
    return start


def _header_bound(plan: "MergePlan", name: str, held: str) -> float:
    """max|W| from the dtype alone; for a quantized weight, its codes' range times its largest scale."""
    weight = plan.base.quantized.get(name)
    if weight is None:
        return largest(held)
    if weight.scheme == "mxfp4":  # a power of two times a code: exact in bf16
        return dequant_mxfp4.largest(dequant_mxfp4.read_scales(plan.base, weight))
    parts = dequant.read_parts(plan.base, weight)  # the small tensors: scales and code maps
    if weight.scheme == "fp8":
        return dequant.E4M3_MAX * _max(np.abs(_float64(parts["scale_inv"]))) * (1 + 2 * unit("F32"))
    code, scale = _max(np.abs(_float64(parts["quant_map"]))), _max(np.abs(_float64(dequant.bnb_absmax(weight, parts))))
    return code * scale * (1 + 2 * unit("F32")) * (1 + 2 * unit(held))  # a float32 product, rounded into `held`


def _row_blocks(values: np.ndarray, held: str | None):
    """Values (as `held` holds them: bf16 as its bits; None: plain numpy) in float64 row blocks
    of at most ROW_BLOCK elements, 2-D."""
    rows = values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(-1, 1)
    step = max(1, ROW_BLOCK // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        block = rows[start: start + step]
        yield _float64(dequant.widen(block, held) if held not in (None, "F64") else block)


def _held_values(plan: "MergePlan", name: str, held: str) -> np.ndarray:
    """The base tensor as shard.py holds it (bf16 as its bits; a quantized weight dequantized)."""
    base = plan.base
    weight = base.quantized.get(name)
    if weight is not None and weight.scheme == "mxfp4":
        return dequant_mxfp4.read(base, weight)
    raw = base.store(name).raw(name)
    if weight is not None:
        return dequant.dequantize(weight, raw, dequant.read_parts(base, weight))
    return raw.view(_NUMPY[held]).reshape(base.info(name).shape)


def _statistics(blocks, layout: Layout, wants_rows: bool, wants_frobenius: bool) -> Start:
    """max|W|, and where asked the row norms of its (out, in) view and its Frobenius norm."""
    largest_value, squares, columns, rows = 0.0, 0.0, None, []
    with np.errstate(all="ignore"):
        for block in blocks:
            largest_value = max(largest_value, _max(np.abs(block)))
            if wants_rows or wants_frobenius:
                square = block * block
                squares += float(np.sum(square))
                if wants_rows and layout is Layout.LINEAR:
                    rows.append(np.sum(square, axis=1))
                elif wants_rows:  # Conv1D (in, out), embedding (num, dim): the view is W.T
                    columns = np.sum(square, axis=0) if columns is None else columns + np.sum(square, axis=0)
        start = Start(largest_value, exact=True, frobenius=math.sqrt(squares) if wants_frobenius else None)
        if wants_rows:
            squared = (np.concatenate(rows) if rows else np.zeros(0)) if layout is Layout.LINEAR else columns
            start.row_norms = np.sqrt(squared if squared is not None else np.zeros(0))
    return start


def _rounded_into(start: Start, held: str) -> Start:
    """Bounds of values after their rounding into `held` (Inf where it can overflow)."""
    grow = 1 + 2 * unit(held)
    finite = start.largest < overflows_at(held)
    start.largest = min(start.largest * grow, largest(held)) if finite else math.inf
    if start.frobenius is not None:
        start.frobenius *= grow
    if start.row_norms is not None:
        start.row_norms = start.row_norms * (1 - 2 * unit(held))  # a lower bound is what DoRA needs
    return start


# ---- the decision ---------------------------------------------------------------------------------


def _settled(plan: "MergePlan", name: str, ops: "TensorOps", updates: list[Update], start: Start,
             held: str, out: str, compute: str) -> bool:
    """True when the bounds prove the merged tensor finite in `out`; False when they cannot."""
    if not updates:  # replaced values or rows only: cast from `held` into `out`, no arithmetic
        return start.largest < limit(out, held)
    u = unit(compute)
    if not all(up.inner < overflows_at(compute) for up in updates):
        return False
    w = start.largest * (1 + 2 * u if FORMATS[held][0] > FORMATS[compute][0] else 1)  # held wider: rounded
    delta = sum(up.entry for up in updates)
    exact = 1 + 2.0**-50  # the float64 arithmetic of these bounds
    module = ops.modules[0] if ops.modules else None
    if module is not None and module.diag_key:
        if start.frobenius is None:
            return False
        # |truncated W_ij| ≤ σ₁ ≤ ‖W‖_F, with the SVD's and the product's rounding
        sigma = start.frobenius * (1 + (min(plan.base.info(name).shape) + 8) * 4 * u)
        return w < overflows_at(compute) and (sigma + delta) * (1 + 2 * u) * exact < limit(out, compute)
    if module is not None and module.magnitude_key:
        return start.row_norms is not None and _dora_settled(plan, module, updates[0], start, w + delta, out, compute)
    total = (w + delta) * (1 + 2 * u) ** (len(updates) - 1) * exact  # one rounding per update after the first
    return total < limit(out, compute)


def _dora_settled(plan: "MergePlan", module, update: Update, start: Start, largest_sum: float, out: str, compute: str) -> bool:
    """DoRA: W + ΔW finite; every row norm of it bounded away from 0 so that m/‖W + ΔW‖ is finite;
    then |m_i·v_ij/‖v_i‖| ≤ |m_i| (a norm that overflows makes the row 0, finite too)."""
    u = unit(compute)
    if not largest_sum * (1 + 2.0**-50) < overflows_at(compute):
        return False
    magnitude = np.abs(_float64(plan.adapter.tensors.array(module.magnitude_key))).reshape(-1)
    if update.rows is None or not magnitude.shape == start.row_norms.shape == update.rows[0].shape:
        return False
    err = (module.in_features + 8) * 4 * u  # the norm's rounding, the quotient's, the product's
    (delta_low, delta_high), w_low, w_high = update.rows, start.row_norms * (1 - 1e-12), start.row_norms * (1 + 1e-12)
    with np.errstate(all="ignore"):
        norm_low = np.maximum(w_low - delta_high, delta_low - w_high)  # ≤ ‖W_i + ΔW_i‖ (triangle inequality)
        low = norm_low * (1 - 2 * u) * (1 - err)  # ≤ the computed ‖v_i‖
        return bool(np.all(low >= TINY_NORM) and np.all(magnitude * (1 + err) < low * overflows_at(compute))
                    and _max(magnitude) * (1 + err) / (1 - err) < limit(out, compute))


# ---- step 3: merge's own arithmetic ----------------------------------------------------------------


class _Discard:
    """The writer interface kernel_numpy and kernel_torch write into: one scratch buffer, reused."""

    def __init__(self):
        self.scratch = np.empty(0, dtype=np.uint8)

    def buffer(self, nbytes: int) -> np.ndarray:
        if self.scratch.size < nbytes:
            self.scratch = np.empty(nbytes, dtype=np.uint8)
        return self.scratch[:nbytes]

    def write(self, data, *, slot: bool = False, ready=None) -> None:
        if ready is not None:
            ready.synchronize()


def _merge_exactly(plan: "MergePlan", name: str, ops: "TensorOps", held: str, out: str) -> LoraToolsError | None:
    """Merge this one tensor as shard.py does on the CPU, output discarded: its refusal, or None."""
    from . import kernel_numpy
    from . import shard as merge_shard

    from .plan import OutputTensor, kernel_for

    values = _held_values(plan, name, held)
    shape = tuple(plan.base.info(name).shape)
    tensor = OutputTensor(name, out, shape, name, "merge", kernel_for(ops, held, out, shape, "cpu"), held)
    torch_state = merge_shard._TorchState("cpu")
    try:
        merge_shard._merge_tensor(replace(plan, ops={name: ops}), tensor, values.reshape(-1).view(np.uint8), _Discard(),
                                  kernel_numpy.Workspace(), torch_state)
        torch_state.verify()
    except LoraToolsError as exc:
        if exc.code != "non-finite":
            raise
        return exc
    return None


def _message(plan: "MergePlan", name: str, ops: "TensorOps", updates: list[Update], start: Start, out: str, held: str) -> str:
    """merge's own words ("merged X is not finite"), with what the bounds say is too large."""
    merged = f"merged {name} is not finite in {NAMES[out]}"
    saved = ops.replace_key or (ops.rows[0].key if ops.rows else None)
    if saved is not None:
        largest_saved = _max(np.abs(_float64(plan.adapter.tensors.array(saved))))
        if not updates or not largest_saved < overflows_at(held):
            where = NAMES[held] if not largest_saved < overflows_at(held) else NAMES[out]
            return f"{merged}: {saved} holds values up to {_number(largest_saved)}, beyond {where}"
    elif start.exact and not start.largest < limit(out, held):
        return f"{merged}: the base tensor itself holds values up to {_number(start.largest)} (or NaN)"
    module = plan.adapter.module(max(updates, key=lambda up: up.entry).module)
    delta = _number(sum(up.entry for up in updates))
    if not ops.modules:
        what = f"b + s·lora_B.bias of module {module.path}, |s·bias| up to {delta}"
    else:
        what = ("DoRA's m·(W + ΔW)/‖W + ΔW‖" if module.magnitude_key else "KaSA's truncated W + ΔW" if module.diag_key
                else "W + ΔW") + f" of module {module.path}, |ΔW| up to {delta} by the factors' norms"
        if module.magnitude_key:
            what += f", |m| up to {_number(_max(np.abs(_float64(plan.adapter.tensors.array(module.magnitude_key)))))}"
    why = ("a row of W + ΔW has a norm of 0 (or near it), or the values are too large" if module.magnitude_key
           else "the adapter's values are too large to merge (training diverged?)")
    return f"{merged} ({what}, |{'W' if ops.modules else 'b'}| up to {_number(start.largest)}): {why}"


def _number(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else "beyond 1e308"
