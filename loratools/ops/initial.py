"""PiSSA, OLoRA, CorDA and LoRA-GA adapters as LoRA on the original base, given the initial
adapter PEFT saved before training (`--initial DIR`).

These methods initialise A0, B0 from the base weight and train on W_res = W − s·B0·A0 (the base
is rewritten). After training, W_res + s·B·A = W + s·(B·A − B0·A0): on the original W the adapter
is ΔW = s·[B | −B0]·[A; A0], rank 2r — PEFT's own conversion (save_pretrained with
path_initial_model_for_weight_conversion). Each module keeps its scaling: r becomes 2r and
lora_alpha is set so that alpha/r (or alpha/√r under rsLoRA) is unchanged, per module.

An initial adapter with the right modules and shapes but other values (another base's, another
init's, the trained adapter itself) would convert without complaint and be wrong, so it is
checked first; every refusal has the code `initial-mismatch`.

- From the files alone (`relative_to_initial`): the config (init_lora_weights True — how PEFT
  saves it — or the adapter's own; peft_type, r, lora_alpha, patterns, rsLoRA, target modules),
  the modules and shapes, that it is not the trained adapter, and the form each init gives its
  factors (PEFT's layer.py): PiSSA B0 = U·√(S/s), A0 = √(S/s)·Vᵀ (B0ᵀB0 = A0·A0ᵀ, diagonal); OLoRA
  B0 = Q_r, A0 = R_r (orthonormal columns, upper triangular; no division by s); CorDA
  B0 = U·√(S/s) (orthogonal columns); LoRA-GA B0 = U·S, A0 = Vᵀ up to scales (orthogonal
  columns, orthonormal rows); embeddings, which PEFT initialises as plain LoRA (A0 = 0) under
  every one of these inits, B0·A0 = 0.
- Against the original base weight W (`check_on_base`, merge and `convert --base`), float32 as
  PEFT takes it, one weight at a time: PiSSA: s·B0·A0 = W_r, the best rank-r part of W — its
  singular values are W's top r (svdvals of W; those of s·B0·A0 exactly from the r×r core) and it
  is W's projection onto its own column and row spaces (Q_bᵀ·(W − s·B0·A0) = 0 and
  (W − s·B0·A0)·Q_a = 0); the two make it a sum of r singular triplets of W, the top r.
  pissa_niter_K (torch.svd_lowrank, random): W's projection onto its column or its row space,
  exact for any randomized SVD of W, false for another base's. OLoRA: B0 spans W's first r
  columns and B0·A0 = Q_r·Q_rᵀ·W. CorDA: s·B0·A0 = U_r·U_rᵀ·W (W·C = U·S·Vᵀ, A0 carries C⁻¹), to
  PEFT's own accepted error of C⁻¹ (5%). CorDA's columns and LoRA-GA's values come from the data
  they were initialised on and cannot be checked.
- Tolerances, relative: 1e-4 for float32 SVD/QR/GEMM round-off (measured 1e-6 up to 4096×4096);
  plus 4·√r·u for factors saved in a dtype of unit roundoff u (rounding B0, A0 moves s·B0·A0 by
  at most 2·√r·u of its norm); plus, against the base, 2·2⁻⁸ because PEFT may have seen the base
  rounded to bfloat16 (a float32 checkpoint loaded in bfloat16 for training). Another base's or
  another init's initial adapter is off by O(1).
"""

from __future__ import annotations

import math

from ..adapter import Adapter, LoraModule
from ..arch import Layout, Role
from ..config import BASE_MODIFYING_INITS, CONVERTIBLE_INITS, with_module_ranks
from ..errors import ConfigError, FormatError, ShapeError, UnsupportedError
from ..formats.checkpoint import Checkpoint
from .lowrank import require_finite

# torch is imported inside the functions: merge/plan.py (torch-free, shared with validate) imports this module.

FLOAT32_NOISE = 1e-4  # float32 SVD / QR / GEMM round-off, relative (measured ~1e-6)
BASE_ROUNDING = 2 * 2.0**-8  # PEFT may have initialised from the base rounded to bfloat16
CORDA_INVERSE = 0.05  # PEFT's CorDA accepts a covariance inverse with ‖C·C⁻¹ − I‖ < 0.05
# the config fields that decide which modules PEFT initialised and how (scaling)
CONFIG_FIELDS = ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules")
FACTOR_FORMS = {
    "pissa": "PiSSA's B0 = U·√(S/s), A0 = √(S/s)·Vᵀ (B0ᵀB0 and A0·A0ᵀ the same diagonal matrix)",
    "olora": "OLoRA's B0 = Q_r, A0 = R_r from the QR of the base weight (orthonormal columns, A0 upper triangular)",
    "corda": "CorDA's B0 = U·√(S/s) (orthogonal columns)",
    "lora_ga": "LoRA-GA's B0 = U·S, A0 = Vᵀ from the gradient's SVD (orthogonal columns, orthonormal rows up to one scale)",
}
# what no check can reach: the values these inits take from their data
FROM_DATA = {"corda": "; CorDA's columns come from its data, which cannot be checked without it",
             "lora_ga": "; LoRA-GA's values come from its gradients, which cannot be checked without the data"}


def needs_initial(adapter: Adapter) -> str | None:
    """The init_lora_weights value that makes this adapter relative to a rewritten base, or None."""
    init = adapter.config.raw.get("init_lora_weights")
    return init if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS) else None


def init_kind(init: str) -> str:
    """pissa, pissa_niter (randomized SVD), olora, corda or lora_ga."""
    init = init.lower()
    return "pissa_niter" if init.startswith("pissa_niter_") else "corda" if init.startswith("corda") else init


def relative_to_initial(adapter: Adapter, initial: Adapter) -> Adapter:
    """The adapter as plain LoRA on the original base: A′ = [A; A0], B′ = [B | −B0], once every
    check that needs no base passed (check_on_base makes the others)."""
    import torch

    init = needs_initial(adapter)
    if init is None:
        raise UnsupportedError(f"--initial: the adapter's init_lora_weights is {adapter.config.raw.get('init_lora_weights')!r}; "
                               "only PiSSA/OLoRA/CorDA/LoRA-GA adapters are relative to an initial adapter")
    if not init.lower().startswith(CONVERTIBLE_INITS):
        raise UnsupportedError(f"init_lora_weights={init!r}: its base is rewritten by quantization, which an initial "
                               "adapter does not undo; merge into the base it was trained on")
    _check_config(adapter, initial, init)
    if set(initial.modules) != set(adapter.modules):
        missing = sorted(set(adapter.modules) ^ set(initial.modules))
        raise ShapeError(f"--initial has other modules than the adapter (e.g. {missing[0]}): not its initial adapter",
                         code="initial-mismatch")
    tensors = adapter.state_dict()
    ranks: dict[str, tuple[int, float]] = {}
    use_rslora = adapter.config.use_rslora
    for path, module in adapter.modules.items():
        if module.magnitude_key or module.lora_bias_key or module.diag_key:
            raise UnsupportedError(f"module {path}: DoRA, lora_bias or KaSA with a {init} init: PEFT's conversion "
                                   "does not cover it either")
        (a, b), (a0, b0) = adapter.factors(path), initial.factors(path)
        require_finite(f"module {path}", a, b)  # before the checks' QR/SVD fail on them (LinAlgError)
        require_finite(f"module {path}", a0, b0, where="the --initial adapter's factors")
        if a0.shape != a.shape or b0.shape != b.shape:
            raise ShapeError(f"module {path}: initial factors {list(a0.shape)}/{list(b0.shape)} differ from the "
                             f"adapter's {list(a.shape)}/{list(b.shape)}: not its initial adapter", code="initial-mismatch")
        dtype = torch.promote_types(a.dtype, a0.dtype)
        # A is (r, in) and B (out, r) for every layout (lora_embedding_A/B too): ranks stack as rows of A, columns of B
        tensors[module.a_key] = torch.cat([a.to(dtype), a0.to(dtype)], dim=0)
        tensors[module.b_key] = torch.cat([b.to(dtype), -b0.to(dtype)], dim=1)
        rank = 2 * module.rank
        ranks[path] = (rank, module.scaling * (math.sqrt(rank) if use_rslora else rank))  # the same scaling
    _check_factors(adapter, initial, init)
    raw = with_module_ranks({**adapter.config.raw, "init_lora_weights": True}, ranks, use_rslora)
    converted = Adapter.from_tensors(raw, tensors, source=adapter.source)
    converted.derived_from = (adapter, initial)  # outputs must not overwrite either input
    converted.from_initial = (adapter, initial, init)  # for check_on_base
    return converted


def check_on_base(base: Checkpoint, adapter: Adapter) -> bool:
    """For an adapter made by relative_to_initial: check the initial adapter's values against the
    original base weights (read one at a time, float32), raising `initial-mismatch`. Returns
    whether there was anything to check (False for any other adapter)."""
    pair = getattr(adapter, "from_initial", None)
    if pair is None:
        return False
    import torch

    from .basemap import BaseNameMapper, adapter_for_base
    from .dequant import read_float32

    original, initial, init = pair
    kind = init_kind(init)
    if kind == "lora_ga":
        return True  # its values follow from the gradients, not from W
    original = adapter_for_base(base, original)
    mapper = BaseNameMapper(base, original)
    for path, module in original.modules.items():
        a0, b0 = (t.to(torch.float64) for t in initial.factors(path))
        if module.layout is Layout.EMBEDDING or _is_zero(a0, b0):
            continue  # plain LoRA init (checked from the files): the base was not rewritten
        _require_olora_linear(kind, module)
        name = mapper.find(f"{path}.weight", f"module {path}", lm_head=module.role is Role.LM_HEAD)
        w = read_float32(base, name)
        w = torch.from_numpy(w if w.flags.writeable else w.copy())  # one copy of the weight at most
        if tuple(w.shape) != module.weight_shape:
            raise ShapeError(f"module {path}: base {name} is {list(w.shape)}, the adapter needs {list(module.weight_shape)}")
        require_finite(f"module {path}", w, where=f"base {name}")
        tol = _tolerance(module, initial) + BASE_ROUNDING + (CORDA_INVERSE if kind == "corda" else 0.0)
        problem = _base_mismatch(kind, module, a0, b0, w.T if module.layout is Layout.CONV1D else w, tol)
        if problem:
            raise FormatError(f"module {path}: the initial adapter's {problem} base {name} (tolerance {tol:.1e}): "
                              f"made for another base or with another init, not this adapter's initial adapter"
                              f"{FROM_DATA.get(kind, '')}", code="initial-mismatch")
    return True


def _check_config(adapter: Adapter, initial: Adapter, init: str) -> None:
    raw, raw0 = adapter.config.raw, initial.config.raw
    init0 = raw0.get("init_lora_weights", True)
    if not (init0 is True or (isinstance(init0, str) and init0.lower() == init.lower())):
        raise ConfigError(f"--initial: its init_lora_weights is {init0!r}, not True (as PEFT saves an initial adapter) or "
                          f"the adapter's {init!r}: not its initial adapter", code="initial-mismatch")
    for key in CONFIG_FIELDS:
        if _normalised(raw.get(key)) != _normalised(raw0.get(key)):
            raise ConfigError(f"--initial: its {key} is {raw0.get(key)!r}, the adapter's {raw.get(key)!r}: not its "
                              "initial adapter", code="initial-mismatch")


def _normalised(value):
    if isinstance(value, (list, tuple, set)):
        return sorted(value)  # PEFT saves target_modules from a set: any order
    return None if value is None or value is False or value == {} or value == [] else value


def _check_factors(adapter: Adapter, initial: Adapter, init: str) -> None:
    """What can be checked without the base: not the trained adapter, and the form of the factors."""
    import torch

    if all(all(torch.equal(x, y) for x, y in zip(adapter.factors(p), initial.factors(p))) for p in adapter.modules):
        raise FormatError("--initial has the adapter's own factors in every module: it is the trained adapter, not the "
                          "initial adapter PEFT saved before training", code="initial-mismatch")
    kind = init_kind(init)
    form = FACTOR_FORMS["pissa" if kind == "pissa_niter" else kind]
    zero = []
    for path, module in adapter.modules.items():
        a0, b0 = (t.to(torch.float64) for t in initial.factors(path))
        zero.append(_is_zero(a0, b0))
        if module.layout is Layout.EMBEDDING:
            if not zero[-1]:
                raise FormatError(f"module {path}: an embedding, which PEFT initialises as plain LoRA (A0 = 0) under {init}, "
                                  "but the initial adapter's B0·A0 is not zero: not its initial adapter", code="initial-mismatch")
            continue
        _require_olora_linear(kind, module)
        if zero[-1] and kind == "lora_ga":
            continue  # PEFT falls back to a plain init (B0 = 0) where it has no gradient
        tol = _tolerance(module, initial)
        off = _form_error(kind, a0, b0)
        if off > tol:
            raise FormatError(f"module {path}: the initial adapter's factors are not {form} ({off:.1e} off, tolerance "
                              f"{tol:.1e}): not the initial adapter of this {init} adapter{FROM_DATA.get(kind, '')}",
                              code="initial-mismatch")
    if all(zero) and any(m.layout is not Layout.EMBEDDING for m in adapter.modules.values()):
        raise FormatError(f"--initial has B0·A0 = 0 in every module: a freshly initialised plain LoRA, not a {init} "
                          "initial adapter", code="initial-mismatch")


def _require_olora_linear(kind: str, module: LoraModule) -> None:
    if kind == "olora" and module.layout is Layout.CONV1D:
        raise UnsupportedError(f"module {module.path}: OLoRA on a Conv1D module: PEFT's olora_init subtracts s·B0·A0 from "
                               "the stored (in, out) weight without transposing it, which no LoRA on the original base undoes")


def _is_zero(a0, b0) -> bool:
    return not bool(a0.any()) or not bool(b0.any())


def _tolerance(module: LoraModule, initial: Adapter) -> float:
    """FLOAT32_NOISE plus 4·√r·u for factors of unit roundoff u."""
    return FLOAT32_NOISE + 4 * math.sqrt(module.rank) * max(_unit_roundoff(t) for t in initial.factors(module.path))


def _unit_roundoff(t) -> float:
    """The unit roundoff of the precision the values really have: the saved dtype's, or bfloat16's
    / float16's when every value is one of theirs (PEFT rounds the factors of a bfloat16 model to
    bfloat16 before it casts them back to float32)."""
    import torch

    for narrower in (torch.bfloat16, torch.float16):
        if torch.finfo(narrower).eps < torch.finfo(t.dtype).eps:
            continue
        if t.dtype != narrower and torch.equal(t.to(narrower).to(t.dtype), t):
            return torch.finfo(narrower).eps / 2
    return torch.finfo(t.dtype).eps / 2


def _relative(num, den) -> float:
    num, den = float(num), float(den)
    return num / den if den > 0 else 0.0 if num == 0 else math.inf


def _off_diagonal(g) -> float:
    import torch

    return _relative(torch.linalg.norm(g - torch.diag(torch.diagonal(g))), torch.linalg.norm(g))


def _form_error(kind: str, a0, b0) -> float:
    """How far (relative) the float64 factors are from the form `kind` gives them."""
    import torch

    gb, ga = b0.T @ b0, a0 @ a0.T
    eye = torch.eye(gb.shape[0], dtype=gb.dtype)
    if kind in ("pissa", "pissa_niter"):
        return max(_relative(torch.linalg.norm(gb - ga), torch.linalg.norm(ga)), _off_diagonal(gb))
    if kind == "olora":
        lower = torch.tril(a0[:, : a0.shape[0]], -1)
        return max(float(torch.linalg.norm(gb - eye)) / math.sqrt(gb.shape[0]),
                   _relative(torch.linalg.norm(lower), torch.linalg.norm(a0)))
    if kind == "corda":
        return _off_diagonal(gb)
    return max(_off_diagonal(gb), _relative(torch.linalg.norm(ga - torch.diagonal(ga).mean() * eye), torch.linalg.norm(ga)))


def _base_mismatch(kind: str, module: LoraModule, a0, b0, w, tol: float) -> str | None:
    """What is wrong with the initial factors (float64) on W (float32, (out, in)), or None."""
    import torch

    from .lowrank import factored_svd, padded

    r, s = module.rank, module.scaling
    k = 1.0 if kind == "olora" else s  # OLoRA: B0·A0 = Q_r·R_r (PEFT does not divide by s)
    qb, rb = torch.linalg.qr(b0)
    qw = (qb.to(w.dtype).T @ w).to(torch.float64)  # Q_bᵀ·W
    left = _relative(torch.linalg.norm(qw - k * rb @ a0), torch.linalg.norm(qw))
    if kind == "olora":
        cols = w[:, :r].to(torch.float64)
        outside = _relative(torch.linalg.norm(cols - qb @ (qb.T @ cols)), torch.linalg.norm(cols))
        if outside > tol:
            return f"B0 does not span the first {r} columns ({outside:.1e} of them outside) of"
        return f"B0·A0 is {left:.1e} off Q_r·R_r, the projection onto its columns, of" if left > tol else None
    if kind == "corda":
        return f"s·B0·A0 is {left:.1e} off the projection onto B0's columns of" if left > tol else None
    qa, ra = torch.linalg.qr(a0.T)
    wq = (w @ qa.to(w.dtype)).to(torch.float64)  # W·Q_a
    right = _relative(torch.linalg.norm(wq - k * b0 @ ra.T), torch.linalg.norm(wq))
    if kind == "pissa_niter":
        off = min(left, right)
        return f"s·B0·A0 is {off:.1e} off the projection onto its own columns or rows (a randomized SVD) of" if off > tol else None
    sigma = padded(torch.linalg.svdvals(w).to(torch.float64).numpy(), r)
    ours = padded(factored_svd(b0, a0, s).s, r)
    spread = _relative(max(abs(x - y) for x, y in zip(ours, sigma)), sigma[0])
    if spread > tol:
        return f"s·B0·A0 is not the best rank-{r} part (its singular values differ by {spread:.1e} of σ1) of"
    off = max(left, right)
    return f"s·B0·A0 is not the best rank-{r} part ({off:.1e} off its projections onto its singular vectors) of" if off > tol else None
