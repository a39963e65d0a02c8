"""AdaLoRA adapters (PEFT `peft_type: ADALORA`), read as the plain LoRA they are equivalent to.

What PEFT saves: per module `<path>.lora_A` (k, in), `<path>.lora_B` (out, k) and `<path>.lora_E`
(k, 1) — no `.weight` suffix — where k is the rank the budget allocator kept: the config's
`rank_pattern` maps `<path>.lora_E` to a boolean mask over the `init_r` initial ranks, and PEFT
saves only the kept rows/columns. `ranknum` is not saved: loading gives it init_r (PEFT copies
the value it had before pruning), and PEFT computes

    ΔW = B · (A ⊙ E) · scaling / (ranknum + 1e-5),   scaling = lora_alpha (or k when alpha ≤ 0)

in float32. That is a plain LoRA with A′ = A ⊙ E, B′ = B and, per module, s = scaling /
float32(init_r + 1e-5); it is written with lora_alpha = s·k per module (exact patterns), so every
command reads an AdaLoRA adapter as that LoRA. A module pruned to rank 0 adds nothing and is
left out (reported). Reading folds E into A, so it loads the tensors (small) with torch.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..adapter import PREFIX, factor_keys
from ..config import with_module_ranks
from ..errors import ConfigError, LoraToolsError, ShapeError
from ..formats.tensors import TensorStore

PEFT_TYPE = "ADALORA"
# AdaLoRA's own config fields: its schedule, and rank_pattern in its mask format.
ADALORA_FIELDS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
                  "rank_pattern")
# rank_pattern holds a list of init_r booleans per module, and PEFT computes with float32(init_r).
MAX_INIT_R = 1 << 24
_PART = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[ABE])$")


def is_adalora(raw: Any) -> bool:
    return isinstance(raw, dict) and raw.get("peft_type") == PEFT_TYPE


def adalora_problems(raw: dict, store: TensorStore) -> list[LoraToolsError]:
    """What makes the file not an AdaLoRA adapter PEFT would load (each with a code)."""
    problems: list[LoraToolsError] = []
    init_r = raw.get("init_r", 12)
    if not isinstance(init_r, int) or isinstance(init_r, bool) or not 1 <= init_r <= MAX_INIT_R:
        return [ConfigError(f"AdaLoRA init_r must be a positive integer (at most {MAX_INIT_R}), got {init_r!r}",
                            code="adalora-config")]
    masks = raw.get("rank_pattern") or {}
    if not isinstance(masks, dict) or not all(isinstance(m, list) and all(isinstance(x, bool) for x in m) for m in masks.values()):
        return [ConfigError("AdaLoRA rank_pattern must map `<module>.lora_E` to lists of booleans", code="adalora-config")]
    modules = _modules(store)
    for key in masks:
        path = key.removesuffix(".lora_E")
        if path == key or path not in modules:  # PEFT looks each masked module up in the model to resize it, and fails
            problems.append(ShapeError(f"rank_pattern has a mask for {key[:200]!r}, but the file has no AdaLoRA module "
                                       f"{path[:200]!r} (keys are `<module>.lora_E` of saved modules); PEFT cannot "
                                       "load it", code="adalora-rank"))
    for path, parts in modules.items():
        if set(parts) != {"A", "B", "E"}:
            problems.append(ShapeError(f"module {path}: AdaLoRA needs lora_A, lora_B and lora_E, has "
                                       f"{', '.join('lora_' + p for p in sorted(parts))}", code="adalora-shape"))
            continue
        a, b, e = (store.meta(parts[p]).shape for p in "ABE")
        if len(a) != 2 or len(b) != 2 or e != (a[0], 1) or b[1] != a[0]:
            problems.append(ShapeError(f"module {path}: lora_A {list(a)}, lora_B {list(b)} and lora_E {list(e)} "
                                       "disagree (expected (k, in), (out, k), (k, 1))", code="adalora-shape"))
            continue
        mask = masks.get(f"{path}.lora_E")
        kept = sum(mask) if mask is not None else init_r
        if a[0] != kept or (mask is not None and len(mask) != init_r):
            where = f"rank_pattern keeps {kept} of {len(mask)}" if mask is not None else f"init_r is {init_r}"
            problems.append(ShapeError(f"module {path}: rank {a[0]} in the file, but {where}", code="adalora-rank"))
    return problems


def as_lora(raw: dict, store: TensorStore) -> tuple[dict, dict, list[str]]:
    """(plain LoRA config, its tensors, modules pruned to rank 0) for an AdaLoRA adapter whose
    adalora_problems() are empty."""
    import torch

    init_r = raw.get("init_r", 12)
    alpha = raw.get("lora_alpha", 8)
    ranknum = float(np.float32(init_r) + np.float32(1e-5))  # PEFT's float32 ranknum + 1e-5
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    pruned = []
    modules = _modules(store)
    for path, parts in modules.items():
        a, b, e = (store.get(parts[p]) for p in "ABE")
        k = a.shape[0]
        if k == 0:
            pruned.append(path)
            continue
        s = (alpha if alpha > 0 else float(k)) / ranknum
        a_key, b_key = factor_keys(path, False)
        tensors[a_key], tensors[b_key] = (a * e).contiguous(), b
        ranks[path] = (k, s * k)  # alpha / r = s
    owned = {key for parts in modules.values() for key in parts.values()}
    for key in store.keys():
        if key not in owned:
            tensors[key] = store.get(key)  # modules_to_save, biases, anything else: as stored
    lora = {k: v for k, v in raw.items() if k not in ADALORA_FIELDS}
    lora.update(peft_type="LORA", use_rslora=False, use_dora=False, alpha_pattern={})
    lora = with_module_ranks(lora, ranks, use_rslora=False)
    if not ranks:  # every module pruned: an adapter of no modules, kept valid
        lora.update(r=max(1, init_r), lora_alpha=alpha, rank_pattern={})
    # The kept modules by their full paths: a pruned module targeted by name would get a fresh,
    # zero LoRA in PEFT (and a missing-keys warning).
    lora["target_modules"] = sorted(ranks) or raw.get("target_modules")
    return lora, tensors, pruned


def _modules(store: TensorStore) -> dict[str, dict[str, str]]:
    """module path -> {"A"|"B"|"E": key} for AdaLoRA's factor tensors."""
    out: dict[str, dict[str, str]] = {}
    for key in store.keys():
        m = _PART.match(key[len(PREFIX):]) if key.startswith(PREFIX) else None
        if m:
            out.setdefault(m["module"], {})[m["part"]] = key
    return out
