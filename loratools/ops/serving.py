"""`validate --target RUNTIME[@VERSION]`: what a serving runtime does with an adapter PEFT loads.

The rules are data: one table per runtime in loratools/runtimes/ (vllm.py, sglang.py,
llama_cpp.py), each rule with the releases it holds for and the runtime source it was read from.
This module evaluates them: a rule names one of the CHECKS below, which returns the parts of the
adapter the rule is about, each with the fields the rule's message is formatted with.

check_target() also returns what serving the adapter needs (its rank as the runtime counts it and
its module names); serving_set() turns those of several adapters into the server options that
serve them together (`validate --target vllm A B C`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

from ..adapter import FACTOR_PARTS, Adapter, LoraModule
from ..arch import Role
from ..arch.experts import is_per_expert
from ..arch.gguf import GGUF_ARCHS
from ..config import BASE_MODIFYING_INITS, scaling
from ..runtimes import ExpertFamilies, RankLimit, Target, resolve
from .gguf_form import experts_layout, gguf_blockers

Add = Callable[..., None]  # add(code, severity, message, module=None)
Hit = tuple[str | None, dict[str, Any]]  # (the module concerned, the message's fields)


def check_target(adapter: Adapter, target: str, add: Add, error: str, warning: str) -> dict[str, Any] | None:
    """Add a finding for every rule of `target` the adapter breaks; return what serving it needs
    ({"target", "rank", "modules"}), or None for a runtime without such server options."""
    chosen = resolve(target)
    for rule in chosen.rules:
        for module, fields in CHECKS[rule.check](adapter, rule.param):
            fix = rule.fix.format(**fields)
            add(rule.code, error if rule.severity == "error" else warning,
                f"{chosen.label} {rule.does.format(**fields)}" + (f"; {fix}" if fix else ""), module)
    limit = _rank_limit(chosen)
    if limit is None:
        return None
    return {"target": chosen.name, "rank": _rank(adapter, limit.counts), "modules": sorted(_leaves(adapter))}


def serving_set(needs: Iterable[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The server options serving these adapters together needs (each adapter's check_target
    result; None for one that could not be read); None when there is nothing to say."""
    known = [n for n in needs if n]
    if not known:
        return None
    chosen = resolve(known[0]["target"])
    rank = max(n["rank"] for n in known)
    modules = sorted({m for n in known for m in n["modules"]})
    limit = _rank_limit(chosen)
    value = rank if limit.values is None else next((v for v in limit.values if v >= rank), None)
    options = []
    for option in chosen.options:
        if option.needs == "rank" and value is not None:
            options.append(f"{option.flag} {value}")
        elif option.needs == "modules" and modules:
            options.append(f"{option.flag} {' '.join(modules)}")
    return {"target": chosen.name, "adapters": len(known), "rank": rank, "max_lora_rank": value,
            "target_modules": modules, "options": options}


def render_serving(serving: dict[str, Any]) -> str:
    """One line for the text report."""
    needs = (" ".join(serving["options"]) if serving["max_lora_rank"] is not None
             else f"rank {serving['rank']} is above every --max-lora-rank it accepts")
    return f"serving the {serving['adapters']} adapter(s) together on {serving['target']}: {needs}"


def _rank_limit(chosen: Target) -> RankLimit | None:
    return next((o.param for o in chosen.options if o.needs == "rank"), None)


def _rank(adapter: Adapter, counts: str) -> int:
    """The adapter's rank as a runtime counts it against its --max-lora-rank."""
    cfg = adapter.config
    extra = {"r": [], "r+modules": [m.rank for m in adapter.modules.values()], "r+rank_pattern": list(cfg.rank_pattern.values())}
    return max([cfg.r, *extra[counts]])


def _leaves(adapter: Adapter) -> set[str]:
    """Module names as --lora-target-modules takes them; fused experts LoRA is the experts module's."""
    experts = {path.rsplit(".", 2)[-2] for path in adapter.experts}
    return {path.rsplit(".", 1)[-1] for path in adapter.modules} | experts


# ---- the checks: (adapter, rule.param) -> hits -----------------------------------------------


def _first(hits: list[tuple[str, LoraModule]], **fields: Any) -> list[Hit]:
    """One finding for many modules: the count and the first as the example."""
    if not hits:
        return []
    path, module = hits[0]
    return [(path, {"n": len(hits), "module": path, **fields})]


def _peft_type(adapter: Adapter, _: Any) -> list[Hit]:
    return [(None, {"peft_type": adapter.origin})] if adapter.origin != "LORA" else []


def _dora(adapter: Adapter, _: Any) -> list[Hit]:
    dora = adapter.config.use_dora or any(m.magnitude_key for m in adapter.modules.values())
    return [(None, {})] if dora else []


def _saved_modules(adapter: Adapter) -> list[str]:
    return list(dict.fromkeys(e.target.rsplit(".", 1)[0] for e in adapter.extras if e.kind == "modules_to_save"))


def _modules_to_save(adapter: Adapter, accepted: tuple[str, ...] | None) -> list[Hit]:
    accepted = accepted or ()
    named = [n for n in adapter.config.modules_to_save if n not in accepted]
    saved = [m for m in _saved_modules(adapter) if m.rsplit(".", 1)[-1] not in accepted and m not in named]
    refused = named + saved
    return [(saved[0] if saved else None, {"modules": ", ".join(refused)})] if refused else []


def _saved_modules_count(adapter: Adapter, most: int) -> list[Hit]:
    saved = _saved_modules(adapter)
    return [(None, {"n": len(saved), "modules": ", ".join(saved)})] if len(saved) > most else []


def _bias(adapter: Adapter, _: Any) -> list[Hit]:
    return [(None, {"bias": adapter.config.bias})] if adapter.config.bias != "none" else []


def _lora_bias(adapter: Adapter, which: str | None) -> list[Hit]:
    keep = {None: lambda s: True, "scaling 1": lambda s: s == 1, "scaled": lambda s: s != 1}[which]
    hits = [(p, m) for p, m in adapter.modules.items() if m.lora_bias_key and keep(m.scaling)]
    return _first(hits, scaling=hits[0][1].scaling if hits else 1)


# Tensor names a runtime's parser takes for LoRA factors (a refused variant may store its own under them).
_FACTOR_SUFFIXES = tuple(f".{part}" for parts in FACTOR_PARTS.values() for part in parts)


def _tensors(adapter: Adapter, kinds: tuple[str, ...]) -> list[Hit]:
    found = {
        "lora_diag": ("KaSA's lora_diag", [(p, m.diag_key) for p, m in adapter.modules.items() if m.diag_key]),
        "trainable tokens": ("trainable_tokens_delta", [(t.path, t.key) for t in adapter.trainable_tokens]),
        "variant": ("LoRA-variant tensors", [(None, k) for k in adapter.variant_keys if not k.endswith(_FACTOR_SUFFIXES)]),
    }
    hits = []
    for kind in kinds:
        what, keys = found[kind]
        if keys:
            hits.append((keys[0][0], {"what": what, "n": len(keys), "key": keys[0][1]}))
    return hits


def _saved_embedding(adapter: Adapter, _: Any) -> list[Hit]:
    saved = [e for e in adapter.extras if e.kind == "full_embedding"]
    return [(saved[0].target, {"key": ", ".join(e.key for e in saved)})] if saved else []


def _init(adapter: Adapter) -> str:
    init = adapter.config.raw.get("init_lora_weights")
    return init if isinstance(init, str) else ""


def _init_unread(adapter: Adapter, _: Any) -> list[Hit]:
    init = _init(adapter)
    return [(None, {"init": init})] if init.lower().startswith(BASE_MODIFYING_INITS) else []


def _init_refused(adapter: Adapter, accepted: tuple[str, ...]) -> list[Hit]:
    init = _init(adapter)
    return [(None, {"init": init})] if init and init.lower() not in accepted else []


def _features(adapter: Adapter, features: tuple[tuple[str, str], ...]) -> list[Hit]:
    return [(None, {"key": key, "feature": what}) for key, what in features if adapter.config.raw.get(key)]


def _own_scaling(adapter: Adapter, how: str) -> list[Hit]:
    """Modules PEFT scales otherwise than the runtime does. how: "r, rsLoRA" (the config's
    lora_alpha over r, or over √r with rsLoRA), "r" (lora_alpha / r always), "tensor rank"
    (lora_alpha over each module's own rank)."""
    cfg = adapter.config
    served = {
        "r, rsLoRA": lambda m: cfg.default_scaling,
        "r": lambda m: cfg.lora_alpha / cfg.r,
        "tensor rank": lambda m: scaling(cfg.lora_alpha, m.rank, False),
    }[how]
    wrong = [(p, m) for p, m in adapter.modules.items() if not m.magnitude_key and not math.isclose(m.scaling, served(m))]
    return _first(wrong, served=served(wrong[0][1]) if wrong else 0, own=wrong[0][1].scaling if wrong else 0)


def _mixed_ranks(adapter: Adapter, _: Any) -> list[Hit]:
    other = [(p, m) for p, m in adapter.modules.items() if m.rank != adapter.config.r]
    return _first(other, r=adapter.config.r, rank=other[0][1].rank if other else 0)


def _rank_fields(adapter: Adapter, limit: RankLimit) -> dict[str, Any]:
    rank = _rank(adapter, limit.counts)
    counted = "r" if rank == adapter.config.r else {"r+modules": "a module's rank", "r+rank_pattern": "from rank_pattern"}[limit.counts]
    return {"rank": rank, "counted": counted, "default": limit.default, "max": limit.values[-1]}


def _rank_over_default(adapter: Adapter, limit: RankLimit) -> list[Hit]:
    fields = _rank_fields(adapter, limit)
    if not limit.default < fields["rank"] <= fields["max"]:
        return []
    return [(None, {**fields, "flag": next(v for v in limit.values if v >= fields["rank"])})]


def _rank_over_max(adapter: Adapter, limit: RankLimit) -> list[Hit]:
    fields = _rank_fields(adapter, limit)
    return [(None, fields)] if fields["rank"] > fields["max"] else []


def _embedding(adapter: Adapter, _: Any) -> list[Hit]:
    embeds = [p for p, m in adapter.modules.items() if m.role in (Role.TOKEN_EMBED, Role.LM_HEAD)]
    return [(embeds[0], {"modules": ", ".join(embeds)})] if embeds else []


def _unknown_modules(adapter: Adapter, names: tuple[dict[str, str], frozenset[str]]) -> list[Hit]:
    normalized, known = names
    unknown: dict[str, str] = {}
    for path in adapter.modules:
        parts = path.split(".")
        name = ".".join(parts[-2:]) if len(parts) > 1 and parts[-2] == "indexer" else parts[-1]
        if normalized.get(name, name) not in known:
            unknown.setdefault(name, path)
    if not unknown:
        return []
    return [(next(iter(unknown.values())), {"modules": ", ".join(sorted(unknown)), "known": ", ".join(sorted(known))})]


def _target_modules_string(adapter: Adapter, accepted: tuple[str, ...]) -> list[Hit]:
    value = adapter.config.target_modules
    return [(None, {"value": value})] if isinstance(value, str) and value not in accepted else []


def _stacked(adapter: Adapter, groups: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]) -> list[Hit]:
    layers: dict[str, set[str]] = {}
    for path in adapter.modules:
        parent, _, name = path.rpartition(".")
        layers.setdefault(parent, set()).add(name)
    hits = []
    for slot, parts, needed in groups:
        short = [(parent, names) for parent, names in layers.items() if names & set(parts) and not set(needed) <= names]
        if short:
            parent, names = short[0]
            hits.append((parent, {"slot": slot, "parts": "/".join(parts), "needed": " and ".join(needed), "n": len(short),
                                  "module": parent, "present": ", ".join(sorted(names & set(parts))),
                                  "missing": ", ".join(n for n in needed if n not in names)}))
    return hits


def _conv(adapter: Adapter, layers: str) -> list[Hit]:
    """Modules that are a convolution's LoRA (nn.Conv1d/2d/3d: lora_A has kernel dims)."""
    convs = [(p, m) for p, m in adapter.modules.items() if m.kernel]
    if not convs:
        return []
    first = convs[0][1]
    return _first(convs, layers=layers, conv=f"Conv{len(first.kernel)}d",
                  shape=list(adapter.tensors.meta(first.a_key).shape))


def _gguf_blockers(adapter: Adapter, _: Any) -> list[Hit]:
    return [(path, {"reason": reason}) for path, reason in gguf_blockers(adapter)]


def _gguf_arch(adapter: Adapter, _: Any) -> list[Hit]:
    arch = adapter.architecture
    return [(None, {"archs": ", ".join(GGUF_ARCHS), "arch": arch})] if arch is not None and arch not in GGUF_ARCHS else []


# ---- MoE experts: fused (target_parameters, 3-D) and per-expert (experts.N.<proj>, 2-D) LoRA ---------

def _per_expert(adapter: Adapter) -> list[str]:
    return [p for p in adapter.modules if is_per_expert(p)]


def _family(adapter: Adapter) -> str | None:
    """The base's model_type when known, else the model class PEFT recorded."""
    return adapter.model_type or adapter.config.base_model_class


def _holding(adapter: Adapter, families: ExpertFamilies) -> str | None:
    """How the runtime holds the experts of the adapter's family: "3d" (reads fused LoRA), "2d"
    (an MoE family arch/experts.py knows, held per expert), "unknown" (no family recorded), or None
    (a family recorded that is no MoE family loratools knows: nothing to say about its experts)."""
    family = _family(adapter)
    if family is None:
        return "unknown"
    if family in families.fused:
        return "3d"
    return "2d" if experts_layout(adapter) is not None else None


def _experts_any(adapter: Adapter, _: Any) -> list[Hit]:
    per_expert = _per_expert(adapter)
    if not adapter.experts and not per_expert:
        return []
    first = next(iter(adapter.experts), None) or per_expert[0]
    what = (f"{len(adapter.experts)} fused (target_parameters)" if adapter.experts else f"{len(per_expert)} per-expert")
    return [(first, {"what": what, "module": first})]


def _fused_on_2d(adapter: Adapter, families: ExpertFamilies) -> list[Hit]:
    if not adapter.experts or _holding(adapter, families) != "2d":
        return []
    first = next(iter(adapter.experts))
    return [(first, {"family": _family(adapter), "n": len(adapter.experts), "module": first,
                     "fused": ", ".join(families.fused_labels)})]


def _fused_family_unknown(adapter: Adapter, families: ExpertFamilies) -> list[Hit]:
    if not adapter.experts or _holding(adapter, families) != "unknown":
        return []
    return [(None, {"n": len(adapter.experts), "fused": ", ".join(families.fused_labels)})]


def _fused_unpaired(adapter: Adapter, families: ExpertFamilies) -> list[Hit]:
    """Experts modules whose fused LoRA lacks one of the parameters the runtime stacks together."""
    if _holding(adapter, families) == "2d":
        return []
    by_module: dict[str, set[str]] = {}
    for path in adapter.experts:
        module, _, leaf = path.rpartition(".")
        by_module.setdefault(module, set()).add(leaf)
    short = [(m, leaves) for m, leaves in by_module.items() if not set(families.pair) <= leaves]
    if not short:
        return []
    module, leaves = short[0]
    return [(module, {"n": len(short), "module": module, "present": ", ".join(sorted(leaves)),
                      "pair": " and ".join(families.pair)})]


def _per_expert_on_3d(adapter: Adapter, families: ExpertFamilies) -> list[Hit]:
    per_expert = _per_expert(adapter)
    if not per_expert or _holding(adapter, families) != "3d":
        return []
    return [(per_expert[0], {"family": _family(adapter), "n": len(per_expert), "module": per_expert[0]})]


CHECKS: dict[str, Callable[[Adapter, Any], list[Hit]]] = {
    "peft_type": _peft_type,
    "dora": _dora,
    "modules_to_save": _modules_to_save,
    "saved_modules": _saved_modules_count,
    "bias": _bias,
    "lora_bias": _lora_bias,
    "tensors": _tensors,
    "saved_embedding": _saved_embedding,
    "init_unread": _init_unread,
    "init_refused": _init_refused,
    "features": _features,
    "own_scaling": _own_scaling,
    "mixed_ranks": _mixed_ranks,
    "rank_over_default": _rank_over_default,
    "rank_over_max": _rank_over_max,
    "embedding": _embedding,
    "unknown_modules": _unknown_modules,
    "target_modules_string": _target_modules_string,
    "stacked": _stacked,
    "conv": _conv,
    "gguf_blockers": _gguf_blockers,
    "gguf_arch": _gguf_arch,
    "experts_any": _experts_any,
    "fused_on_2d": _fused_on_2d,
    "fused_family_unknown": _fused_family_unknown,
    "fused_unpaired": _fused_unpaired,
    "per_expert_on_3d": _per_expert_on_3d,
}
