"""Find the architecture behind module paths or a config.json — or say it is unknown.

Detection never guesses: an architecture is reported only when module paths match its table
(and no other family's table equally well), or when config.json names a known model_type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from .roles import Layout, Role
from .tables import ARCHITECTURES, Architecture, Head, ModuleTemplate


@dataclass(frozen=True)
class ModuleRef:
    """Where a module path sits in an architecture."""

    role: Role
    layer: int | None
    layout: Layout
    template: ModuleTemplate


@dataclass(frozen=True)
class Detection:
    architecture: str | None  # None: unknown
    head: str | None = None  # Head.name; None when unknown
    prefix: str | None = None  # the backbone prefix the paths use
    reason: str = ""  # why, in one phrase (shown when unknown)
    unmatched: tuple[str, ...] = field(default=())  # paths that fit no template of the architecture

    @property
    def known(self) -> bool:
        return self.architecture is not None


def _template_regex(template: ModuleTemplate, prefix: str) -> re.Pattern[str]:
    body = re.escape(template.path).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
    return re.compile("^" + ("" if template.in_head else re.escape(prefix)) + body + "$")


@lru_cache(maxsize=None)
def _matchers(arch_name: str, prefix: str) -> tuple[tuple[re.Pattern[str], ModuleTemplate], ...]:
    arch = ARCHITECTURES[arch_name]
    # Head modules (lm_head, classifier...) exist only on head classes, i.e. when there is a prefix.
    return tuple(
        (_template_regex(t, prefix), t) for t in arch.modules if not (t.in_head and prefix == "")
    )


def locate(arch: Architecture | str, prefix: str, path: str) -> ModuleRef | None:
    """The role, layer and layout of `path` (relative to the model root), or None."""
    name = arch if isinstance(arch, str) else arch.name
    for regex, template in _matchers(name, prefix):
        m = regex.match(path)
        if m:
            layer = m.groupdict().get("layer")
            return ModuleRef(template.role, int(layer) if layer is not None else None, template.layout, template)
    return None


def detect_from_paths(
    paths: list[str] | tuple[str, ...], class_name: str | None = None, other_paths: list[str] | tuple[str, ...] = ()
) -> Detection:
    """Detect the architecture from module paths relative to the model root
    (e.g. "model.layers.0.self_attn.q_proj"). `class_name` (a transformers class such as
    "LlamaForCausalLM", when the adapter config records one) picks the head exactly;
    `other_paths` (modules_to_save and the like) only help to pick the head, or stand in for
    `paths` when there are none."""
    paths = list(paths) or list(other_paths)
    if not paths:
        return Detection(None, reason="no modules to detect from")
    # Only backbone modules count as evidence: head modules (lm_head, score, classifier) have
    # the same names in many families and would make anything with an lm_head look known.
    scores: list[tuple[int, str, str]] = []  # (matches, arch, prefix)
    for arch in ARCHITECTURES.values():
        for prefix in sorted({h.prefix for h in arch.heads}):
            refs = (locate(arch.name, prefix, p) for p in paths)
            n = sum(ref is not None and not ref.template.in_head for ref in refs)
            if n:
                scores.append((n, arch.name, prefix))
    if not scores:
        # No backbone module: the model class PEFT recorded (auto_mapping) is the only evidence left.
        for arch in ARCHITECTURES.values():
            head = arch.head_for_class(class_name) if class_name else None
            if head is not None:
                unmatched = tuple(p for p in paths if locate(arch, head.prefix, p) is None)
                return Detection(arch.name, head.name, head.prefix, reason=f"from the recorded class {class_name}", unmatched=unmatched)
        return Detection(None, reason="no module path matches the llama, gpt2 or bert tables")
    scores.sort(reverse=True)
    best, arch_name, prefix = scores[0]
    rivals = sorted({a for n, a, _ in scores if n == best and a != arch_name})
    if rivals:
        return Detection(None, reason=f"module paths fit both {arch_name} and {', '.join(rivals)}")
    arch = ARCHITECTURES[arch_name]
    unmatched = tuple(p for p in paths if locate(arch, prefix, p) is None)
    head = _pick_head(arch, prefix, paths + list(other_paths), class_name)
    return Detection(arch_name, head.name, prefix, unmatched=unmatched)


def _pick_head(arch: Architecture, prefix: str, paths: list[str], class_name: str | None) -> Head:
    candidates = [h for h in arch.heads if h.prefix == prefix]
    if class_name:
        for head in candidates:
            if class_name in head.classes:
                return head
    for head in candidates:
        if any(p == m or p.startswith(m + ".") for m in head.head_modules for p in paths):
            return head
    return candidates[0]  # the family's default for this prefix (causal-lm before the others)


def detect_from_config(config: dict) -> Detection:
    """Detect from a base checkpoint's config.json: model_type, and the head from `architectures`."""
    model_type = config.get("model_type")
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            classes = config.get("architectures") or []
            head = next((h for c in classes if (h := arch.head_for_class(c)) is not None), None)
            if head is None:
                return Detection(arch.name, reason="head class not recorded in config.json")
            return Detection(arch.name, head.name, head.prefix)
    return Detection(None, reason=f"config.json model_type {model_type!r} is not llama, gpt2 or bert")
