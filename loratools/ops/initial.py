"""PiSSA, OLoRA, CorDA and LoRA-GA adapters as LoRA on the original base, given the initial
adapter PEFT saved before training (`--initial DIR`).

These methods initialise A0, B0 from the base weight and train on W_res = W − s·B0·A0 (the base
is rewritten). After training, W_res + s·B·A = W + s·(B·A − B0·A0): on the original W the adapter
is ΔW = s·[B | −B0]·[A; A0], rank 2r — PEFT's own conversion (save_pretrained with
path_initial_model_for_weight_conversion). Each module keeps its scaling: r becomes 2r and
lora_alpha is set so that alpha/r (or alpha/√r under rsLoRA) is unchanged, per module.
"""

from __future__ import annotations

import math

import torch

from ..adapter import Adapter
from ..config import BASE_MODIFYING_INITS, CONVERTIBLE_INITS, with_module_ranks
from ..errors import ShapeError, UnsupportedError


def needs_initial(adapter: Adapter) -> str | None:
    """The init_lora_weights value that makes this adapter relative to a rewritten base, or None."""
    init = adapter.config.raw.get("init_lora_weights")
    return init if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS) else None


def relative_to_initial(adapter: Adapter, initial: Adapter) -> Adapter:
    """The adapter as plain LoRA on the original base: A′ = [A; A0], B′ = [B | −B0]."""
    init = needs_initial(adapter)
    if init is None:
        raise UnsupportedError(f"--initial: the adapter's init_lora_weights is {adapter.config.raw.get('init_lora_weights')!r}; "
                               "only PiSSA/OLoRA/CorDA/LoRA-GA adapters are relative to an initial adapter")
    if not init.lower().startswith(CONVERTIBLE_INITS):
        raise UnsupportedError(f"init_lora_weights={init!r}: its base is rewritten by quantization, which an initial "
                               "adapter does not undo; merge into the base it was trained on")
    if set(initial.modules) != set(adapter.modules):
        missing = sorted(set(adapter.modules) ^ set(initial.modules))
        raise ShapeError(f"--initial has other modules than the adapter (e.g. {missing[0]}): not its initial adapter")
    tensors = adapter.state_dict()
    ranks: dict[str, tuple[int, float]] = {}
    use_rslora = adapter.config.use_rslora
    for path, module in adapter.modules.items():
        if module.magnitude_key or module.lora_bias_key or module.diag_key:
            raise UnsupportedError(f"module {path}: DoRA, lora_bias or KaSA with a {init} init: PEFT's conversion "
                                   "does not cover it either")
        (a, b), (a0, b0) = adapter.factors(path), initial.factors(path)
        if a0.shape != a.shape or b0.shape != b.shape:
            raise ShapeError(f"module {path}: initial factors {list(a0.shape)}/{list(b0.shape)} differ from the "
                             f"adapter's {list(a.shape)}/{list(b.shape)}: not its initial adapter")
        dtype = torch.promote_types(a.dtype, a0.dtype)
        # A is (r, in) and B (out, r) for every layout (lora_embedding_A/B too): ranks stack as rows of A, columns of B
        tensors[module.a_key] = torch.cat([a.to(dtype), a0.to(dtype)], dim=0)
        tensors[module.b_key] = torch.cat([b.to(dtype), -b0.to(dtype)], dim=1)
        rank = 2 * module.rank
        ranks[path] = (rank, module.scaling * (math.sqrt(rank) if use_rslora else rank))  # the same scaling
    raw = with_module_ranks({**adapter.config.raw, "init_lora_weights": True}, ranks, use_rslora)
    converted = Adapter.from_tensors(raw, tensors, source=adapter.source)
    converted.derived_from = (adapter, initial)  # outputs must not overwrite either input
    return converted
