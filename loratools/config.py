"""adapter_config.json: the fields loratools relies on, checked, and PEFT's per-module rank/alpha.

The raw dict is kept as read so that writing an adapter back preserves every field PEFT (or a
newer PEFT) put there, including ones loratools does not know.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .errors import ConfigError, InputNotFoundError, LoraToolsError, UnsupportedError
from .formats.json_text import read_json_file

CONFIG_NAME = "adapter_config.json"


def is_number(x: Any) -> bool:
    """A finite float, or an int a float can hold (JSON allows 4000-digit integers)."""
    try:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    except OverflowError:
        return False


# Ranks are tensor dimensions (int64); a larger "rank" could not even be converted to a float.
MAX_RANK = (1 << 63) - 1


def is_positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 < x <= MAX_RANK


# Patterns come from files users download: bound how many there are, how long each is, and how
# long one match may take (a key like `(a|a)*b` backtracks exponentially; Python's re has no timeout).
MAX_PATTERN_KEYS = 20_000
MAX_PATTERN_LENGTH = 1_000
MATCH_TIMEOUT_S = 0.25
# scaling multiplies float32 factors: beyond this, ΔW overflows to inf.
MAX_SCALING = 1e30


def peft_pattern(key: str) -> str:
    """The expression PEFT matches a rank_pattern / alpha_pattern key with."""
    return rf"(.*\.)?({key})$"


@lru_cache(maxsize=65_536)
def _compiled(expression: str):
    import regex  # the one regex engine with a timeout; same syntax as re for these patterns

    return regex.compile(expression, flags=regex.VERSION0)


def pattern_matches(key: str, module_path: str) -> bool:
    try:
        return _compiled(peft_pattern(key)).match(module_path, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        raise ConfigError(
            f"adapter_config.json: pattern {key[:80]!r} takes too long to match {module_path!r} "
            "(catastrophic backtracking); simplify it",
            code="config-pattern",
        ) from None


@lru_cache(maxsize=65_536)
def literal_tail(key: str) -> str:
    """The literal characters a key ends with: `(.*\\.)?(key)$` can only match a path that ends
    with them. A cheap, exact pre-filter, so that thousands of keys (one per module, as resized or
    AdaLoRA adapters have) cost string comparisons rather than regex matches."""
    try:
        from re import _parser as sre_parse  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import sre_parse  # type: ignore[no-redef]
    try:
        parsed = sre_parse.parse(key)
    except Exception:  # an invalid key is reported elsewhere; no pre-filter for it
        return ""
    if parsed.state.flags & re.IGNORECASE:
        return ""
    tail = []
    for op, arg in reversed(list(parsed)):
        if op is not sre_parse.LITERAL:
            break
        tail.append(chr(arg))
    return "".join(reversed(tail))


def pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup for one module.

    Each key is a regex that must match a dotted suffix of the module path (relative to the
    base model): `(.*\\.)?(key)$`; a leading `^` in the key therefore anchors it to the full path.
    The first key in dict order (= file order) that matches wins. Like PEFT, fall back to an exact
    key lookup before the default.
    """
    for key, value in patterns.items():
        tail = literal_tail(key)
        if tail and not module_path.endswith(tail):
            continue
        if pattern_matches(key, module_path):
            return value
    return patterns.get(module_path, default)


@dataclass
class AdapterConfig:
    raw: dict[str, Any]
    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    base_model_name_or_path: str | None = None
    base_model_class: str | None = None  # from auto_mapping, when PEFT recorded it
    variants: tuple[str, ...] = ()  # PEFT LoRA variants the config selects ("dora", "kasa", ...)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    @classmethod
    def from_dict(cls, raw: Any, source: str = CONFIG_NAME) -> "AdapterConfig":
        """The parsed config; raises the first of config_problems() if there is any."""
        problems = config_problems(raw, source)
        if problems:
            raise problems[0]
        auto = raw.get("auto_mapping")
        return cls(
            raw=raw,
            r=raw.get("r", 8),  # PEFT's defaults for fields a config omits
            lora_alpha=raw.get("lora_alpha", 8),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            bias=raw.get("bias") or "none",
            target_modules=raw.get("target_modules"),
            modules_to_save=raw.get("modules_to_save") or [],
            base_model_name_or_path=raw.get("base_model_name_or_path"),
            base_model_class=auto.get("base_model_class") if isinstance(auto, dict) else None,
            variants=lora_variants(raw),
            trainable_token_indices=raw.get("trainable_token_indices"),
            **{name: raw.get(name) or False for name in FLAGS},
        )

    def refusals(self, merging: bool) -> list[str]:
        return refusals(self.raw, merging)

    def token_indices_for(self, module_path: str) -> list[int] | None:
        """PEFT's trainable_token_indices for one module: a list applies to the input embedding,
        a dict maps module names (matched as a dotted suffix of the path) to lists."""
        tokens = self.trainable_token_indices
        if isinstance(tokens, dict):
            for name, indices in tokens.items():
                if module_path == name or module_path.endswith("." + name):
                    return indices
            return None
        return tokens

    def rank_for(self, module_path: str) -> int:
        return self._lookup("rank_pattern", module_path, self.r)

    def alpha_for(self, module_path: str) -> float:
        return self._lookup("alpha_pattern", module_path, self.lora_alpha)

    def _lookup(self, name: str, module_path: str, default: Any) -> Any:
        memo = self.__dict__.setdefault("_memo", {})  # each module is asked for rank, alpha and scaling
        if (name, module_path) not in memo:
            memo[(name, module_path)] = pattern_value(getattr(self, name), module_path, default)
        return memo[(name, module_path)]

    def scaling_for(self, module_path: str) -> float:
        return scaling(self.alpha_for(module_path), self.rank_for(module_path), self.use_rslora)

    @property
    def default_scaling(self) -> float:
        return scaling(self.lora_alpha, self.r, self.use_rslora)


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (exactly as PEFT computes it)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


FLAGS = ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias")


def config_problems(raw: Any, source: str = CONFIG_NAME) -> list[LoraToolsError]:
    """Every problem with the fields loratools relies on, each an error with a stable code:
    from_dict raises the first, `validate` reports them all."""
    if not isinstance(raw, dict):
        return [ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}", code="config-json")]
    problems: list[LoraToolsError] = []
    peft_type = raw.get("peft_type")
    if peft_type is None:
        problems.append(ConfigError(
            f"{source}: no peft_type (PEFT cannot load it either); add \"peft_type\": \"LORA\"", code="config-peft-type"
        ))
    elif peft_type != "LORA":
        problems.append(UnsupportedError(
            f"{source}: peft_type is {peft_type!r}; loratools handles LoRA adapters only", code="config-peft-type"
        ))
    if not is_positive_int(raw.get("r", 8)):
        problems.append(ConfigError(f"{source}: r must be a positive integer, got {raw.get('r')!r}", code="config-r"))
    if not is_number(raw.get("lora_alpha", 8)):
        problems.append(ConfigError(f"{source}: lora_alpha must be a number, got {raw.get('lora_alpha')!r}", code="config-alpha"))
    elif abs(raw.get("lora_alpha", 8)) > MAX_SCALING:
        problems.append(ConfigError(
            f"{source}: lora_alpha {raw.get('lora_alpha')!r} is too large: ΔW would overflow float32", code="config-alpha"
        ))
    for name, valid, what in (("rank_pattern", is_positive_int, "a positive integer"), ("alpha_pattern", is_number, "a number")):
        patterns = raw.get(name) or {}
        if not isinstance(patterns, dict):
            problems.append(ConfigError(f"{source}: {name} must be an object mapping patterns to values", code="config-pattern"))
            continue
        if len(patterns) > MAX_PATTERN_KEYS:
            problems.append(ConfigError(
                f"{source}: {name} has {len(patterns)} keys (more than {MAX_PATTERN_KEYS}); loratools refuses it", code="config-pattern"
            ))
            continue
        for key, value in patterns.items():
            if not valid(value):
                problems.append(ConfigError(f"{source}: {name}[{key[:80]!r}] must be {what}, got {value!r}", code="config-pattern"))
            elif name == "alpha_pattern" and abs(value) > MAX_SCALING:
                problems.append(ConfigError(f"{source}: {name}[{key[:80]!r}] = {value!r} would overflow float32", code="config-alpha"))
            problem = regex_problem(key, peft_pattern(key))
            if problem:
                problems.append(ConfigError(f"{source}: {name} key {key[:80]!r} {problem}", code="config-pattern"))
    for name in FLAGS:
        value = raw.get(name) or False
        if not isinstance(value, bool):
            problems.append(ConfigError(f"{source}: {name} must be true or false, got {value!r}", code="config-field"))
    if (raw.get("bias") or "none") not in ("none", "all", "lora_only"):
        problems.append(ConfigError(f"{source}: bias must be 'none', 'all' or 'lora_only', got {raw.get('bias')!r}", code="config-field"))
    targets = raw.get("target_modules")
    if targets is not None and not isinstance(targets, str):
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            problems.append(ConfigError(f"{source}: target_modules must be a list of names or a regex string", code="config-field"))
    elif isinstance(targets, str):
        problem = regex_problem(targets, targets)  # PEFT: re.fullmatch(target_modules, module_name)
        if problem:
            problems.append(ConfigError(f"{source}: target_modules {targets[:80]!r} {problem}", code="config-target-modules"))
    tokens = raw.get("trainable_token_indices")
    if tokens is not None and token_indices_problem(tokens):
        problems.append(ConfigError(f"{source}: trainable_token_indices {token_indices_problem(tokens)}", code="config-field"))
    to_save = raw.get("modules_to_save") or []
    if not isinstance(to_save, list) or not all(isinstance(t, str) for t in to_save):
        problems.append(ConfigError(f"{source}: modules_to_save must be a list of module names", code="config-field"))
    return problems


def regex_problem(key: Any, expression: str) -> str | None:
    """Why a user-supplied pattern cannot be used (as PEFT compiles it, with Python's re), or None."""
    if not isinstance(key, str):
        return "is not a string"
    if len(key) > MAX_PATTERN_LENGTH:
        return f"is longer than {MAX_PATTERN_LENGTH} characters"
    try:
        re.compile(expression)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"is not a valid regex ({str(exc).splitlines()[0][:120]})"
    return None


def _is_index_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x)


def token_indices_problem(tokens: Any) -> str | None:
    if _is_index_list(tokens):
        return None
    if isinstance(tokens, dict) and all(isinstance(k, str) and _is_index_list(v) for k, v in tokens.items()):
        return None
    return "must be a list of token ids or an object mapping module names to lists of token ids"


# ---- what an adapter needs beyond s·B·A ----------------------------------------------------------

# LoRA variants PEFT selects from config fields (LoraConfig fields tagged is_lora_variant, and
# init_lora_weights="mica"), in the names PEFT's variant registry uses.
_VARIANT_FIELDS = (
    ("dora", "use_dora"), ("kasa", "kasa_config"), ("velora", "velora_config"), ("monteclora", "monteclora_config"),
    ("bdlora", "use_bdlora"), ("arrow", "arrow_config"), ("qalora", "use_qalora"), ("alora", "alora_invocation_tokens"),
)
# Merged exactly: DoRA (renormalised), KaSA (B·diag(d)·A on the SVD-truncated base), MiCA (plain LoRA),
# VeLoRA and MonteCLoRA (plain s·B·A outside training: PEFT merges and serves get_delta_weight; their
# own tensors, VeLoRA's projection and MonteCLoRA's sampler, act only in a training step), BD-LoRA
# (its block-diagonal factor expanded from the saved blocks when read: Adapter.factors).
MERGEABLE_VARIANTS = frozenset({"dora", "kasa", "mica", "velora", "monteclora", "bdlora"})
# Variants whose saved tensors beyond A and B only training reads: svd analyses them as s·B·A, but a
# rewritten adapter could not carry those tensors, and PEFT would load it with them missing.
TRAINING_STATE_VARIANTS = {"velora": "lora_velora_embed", "monteclora": "lora_monteclora_sampler.*"}
# init_lora_weights values whose adapter is relative to a base PEFT rewrote at initialisation;
# all but LoftQ (which quantizes the base) convert back given the initial adapter (--initial).
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
CONVERTIBLE_INITS = ("pissa", "olora", "corda", "lora_ga")


def lora_variants(raw: dict[str, Any]) -> tuple[str, ...]:
    found = [name for name, key in _VARIANT_FIELDS if raw.get(key)]
    if raw.get("init_lora_weights") == "mica":
        found.append("mica")
    return tuple(found)


def variant_refusals(raw: dict[str, Any], merging: bool, analysis: bool = False) -> list[str]:
    """Why the LoRA variant(s) this config selects cannot be merged exactly (merging=True), or
    treated as ΔW = s·B·A by convert/combine/resize (merging=False) or svd (analysis=True); empty
    when they can."""
    reasons = []
    variants = lora_variants(raw)
    allowed = MERGEABLE_VARIANTS if merging else {"dora", "mica", *(("bdlora", *TRAINING_STATE_VARIANTS) if analysis else ())}
    for variant in variants:
        if variant == "alora":
            reasons.append("aLoRA (alora_invocation_tokens) acts only after its invocation tokens, so it cannot be "
                           "merged into weights (PEFT refuses too)")
        elif variant == "bdlora" and variant not in allowed:
            reasons.append(bdlora_refusal(raw.get("use_bdlora")))
        elif variant in TRAINING_STATE_VARIANTS and variant not in allowed:
            reasons.append(f"LoRA variant {variant}: its ΔW is s·B·A, but its training-only tensors "
                           f"({TRAINING_STATE_VARIANTS[variant]}) cannot be carried over into a rewritten adapter "
                           "(loratools merge, export and svd support it)")
        elif variant not in allowed:
            reasons.append(f"unsupported LoRA variant {variant}: its update is not a plain s·B·A"
                           + ("" if merging else f" (loratools merge supports {variant})" if variant in MERGEABLE_VARIANTS else ""))
    if len([v for v in variants if v in MERGEABLE_VARIANTS]) > 1:
        reasons.append(f"LoRA variants {' + '.join(variants)} together: PEFT has no such combination")
    return reasons


def bdlora_refusal(bd: Any) -> str:
    """BD-LoRA (PEFT's BlockDiagonalLinear) in a rewritten adapter: its block-diagonal factors are
    saved as their blocks, which convert/combine/resize would have to keep as blocks."""
    blocks = (bd if isinstance(bd, dict) else {}).get("nblocks", 1)
    return (f"BD-LoRA (use_bdlora, nblocks={blocks}): PEFT saves each block-diagonal factor as its {blocks} diagonal "
            "blocks, and a rewritten adapter would have to keep that structure (loratools merge, export and svd "
            "expand the blocks and support it)")


def bdlora_blocks(raw: dict[str, Any], path: str) -> tuple[str, int] | None:
    """("A" or "B", nblocks) when BD-LoRA makes module `path`'s A or B block-diagonal, else None.
    PEFT's rule: a pattern of target_modules_bd_a (bd_b) that is a substring of the module's name;
    matching both is PEFT's error."""
    bd = raw.get("use_bdlora")
    if not isinstance(bd, dict):
        return None
    nblocks = bd.get("nblocks", 1)
    sides = [side for side, key in (("A", "target_modules_bd_a"), ("B", "target_modules_bd_b"))
             if any(isinstance(p, str) and p in path for p in bd.get(key) or ())]
    if len(sides) > 1:
        raise ConfigError(f"module {path}: matches both target_modules_bd_a and target_modules_bd_b of use_bdlora "
                          "(PEFT refuses it)", code="config-field")
    if not sides:
        return None
    if not isinstance(nblocks, int) or isinstance(nblocks, bool) or nblocks < 1:
        raise ConfigError(f"use_bdlora.nblocks must be a positive integer, got {nblocks!r}", code="config-field")
    return sides[0], nblocks


def refusals(raw: dict[str, Any], merging: bool, convertible_init: bool = True) -> list[str]:
    """variant_refusals, plus config features that make the adapter relative to another base than
    the one in the checkpoint; empty when an output can be exact. convertible_init=False leaves
    out PiSSA/OLoRA/CorDA/LoRA-GA inits (validate reports those as a warning)."""
    reasons = variant_refusals(raw, merging)
    init = raw.get("init_lora_weights")
    name = init.lower() if isinstance(init, str) else ""
    convertible = name.startswith(CONVERTIBLE_INITS)
    if name.startswith(BASE_MODIFYING_INITS) and (convertible_init or not convertible):
        fix = ("give --initial DIR (the adapter PEFT saved before training) to merge or convert it"
               if convertible else "merge it into the base it was trained on")
        reasons.append(f"init_lora_weights={init!r}: the adapter is relative to a base PEFT rewrote at initialisation, not "
                       f"to the original base; {fix}")
    if raw.get("layer_replication"):
        reasons.append("layer_replication: PEFT duplicates base layers before applying this adapter; merging it into "
                       "the base's own layers would give a different model")
    return reasons


def read_raw_config(path: str | os.PathLike) -> Any:
    """adapter_config.json parsed (not yet checked)."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise InputNotFoundError(f"{path}: no {CONFIG_NAME} (an adapter directory needs one)")
    return read_json_file(path, error=ConfigError, code="config-json")


def config_json(raw: dict[str, Any]) -> str:
    """Serialise a config with sorted top-level keys and indent 2, like PEFT, so outputs are stable.

    Unlike PEFT, nested objects keep their order: rank_pattern / alpha_pattern are first-match-wins,
    and sorting them could change which pattern applies to a module.
    """
    import json

    return json.dumps({key: raw[key] for key in sorted(raw)}, indent=2) + "\n"


def exact_pattern(module_path: str) -> str:
    """A rank/alpha pattern that matches exactly one module path (and nothing ending in it)."""
    return "^" + re.escape(module_path)


def with_module_ranks(raw: dict[str, Any], ranks: dict[str, tuple[int, float]], use_rslora: bool) -> dict[str, Any]:
    """A copy of config `raw` whose per-module (rank, alpha) are exactly `ranks`.

    The most common rank and alpha become the global r / lora_alpha; every module that differs
    gets an anchored, escaped pattern of its own, so nothing depends on how the old patterns
    happened to match. Other fields are kept as they were.
    """
    from collections import Counter

    out = dict(raw)
    if not ranks:
        return out
    r = Counter(rank for rank, _ in ranks.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in ranks.values()).most_common(1)[0][0]
    out.update(
        r=r,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        rank_pattern={exact_pattern(p): rank for p, (rank, _) in ranks.items() if rank != r},
        alpha_pattern={exact_pattern(p): a for p, (_, a) in ranks.items() if a != alpha},
    )
    return out
