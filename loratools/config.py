"""adapter_config.json: the fields loratools relies on, checked, and PEFT's per-module rank/alpha.

The raw dict is kept as read so that writing an adapter back preserves every field PEFT (or a
newer PEFT) put there, including ones loratools does not know.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, InputNotFoundError, LoraToolsError, UnsupportedError

CONFIG_NAME = "adapter_config.json"


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup for one module.

    Each key is a regex that must match a dotted suffix of the module path (relative to the
    base model): `(.*\\.)?(key)$`; a leading `^` in the key therefore anchors it to the full path.
    The first key in dict order (= file order) that matches wins. Like PEFT, fall back to an exact
    key lookup before the default.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
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
            **{name: raw.get(name) or False for name in FLAGS},
        )

    def rank_for(self, module_path: str) -> int:
        return pattern_value(self.rank_pattern, module_path, self.r)

    def alpha_for(self, module_path: str) -> float:
        return pattern_value(self.alpha_pattern, module_path, self.lora_alpha)

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
    for name, valid, what in (("rank_pattern", is_positive_int, "a positive integer"), ("alpha_pattern", is_number, "a number")):
        patterns = raw.get(name) or {}
        if not isinstance(patterns, dict):
            problems.append(ConfigError(f"{source}: {name} must be an object mapping patterns to values", code="config-pattern"))
            continue
        for key, value in patterns.items():
            if not valid(value):
                problems.append(ConfigError(f"{source}: {name}[{key!r}] must be {what}, got {value!r}", code="config-pattern"))
            try:
                re.compile(key)
            except re.error as exc:
                problems.append(ConfigError(f"{source}: {name} key {key!r} is not a valid regex ({exc})", code="config-pattern"))
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
    to_save = raw.get("modules_to_save") or []
    if not isinstance(to_save, list) or not all(isinstance(t, str) for t in to_save):
        problems.append(ConfigError(f"{source}: modules_to_save must be a list of module names", code="config-field"))
    return problems


def read_config(path: str | os.PathLike) -> AdapterConfig:
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise InputNotFoundError(f"{path}: no {CONFIG_NAME} (an adapter directory needs one)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory") from None
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{CONFIG_NAME}: not valid JSON ({exc})") from None
    return AdapterConfig.from_dict(raw)


def config_json(raw: dict[str, Any]) -> str:
    """Serialise a config with sorted top-level keys and indent 2, like PEFT, so outputs are stable.

    Unlike PEFT, nested objects keep their order: rank_pattern / alpha_pattern are first-match-wins,
    and sorting them could change which pattern applies to a module.
    """
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
