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
    architecture: str | None  # the family (see family_known), or None: unknown
    head: str | None = None  # Head.name; None when unknown
    prefix: str | None = None  # the backbone prefix the paths use
    reason: str = ""  # why it is unknown, or what is uncertain, in one phrase
    unmatched: tuple[str, ...] = field(default=())  # paths that fit no template of the architecture
    # True when evidence names the family (recorded model class, a config's model_type); False when
    # only module names were seen and several families share them (then `architecture` is the first
    # of those families, which all store these modules the same way).
    family_known: bool = False
    ambiguous_layout: bool = False  # names fit families that store these weights differently

    @property
    def known(self) -> bool:
        return self.architecture is not None

    @property
    def scheme(self) -> str | None:
        return ARCHITECTURES[self.architecture].scheme if self.architecture else None


def _template_regex(template: ModuleTemplate, prefix: str) -> re.Pattern[str]:
    body = re.escape(template.path).replace(re.escape("{layer}"), r"(?P<layer>\d+)").replace(re.escape("{expert}"), r"\d+")
    return re.compile("^" + ("" if template.in_head else re.escape(prefix)) + body + "$")


@lru_cache(maxsize=None)
def _matchers(arch_name: str, prefix: str) -> tuple[tuple[re.Pattern[str], ModuleTemplate], ...]:
    arch = ARCHITECTURES[arch_name]
    # Head modules (lm_head, classifier...) exist only on head classes: with no backbone prefix
    # (LlamaModel), only where a head class has them at the root (T5ForConditionalGeneration).
    root_heads = {m for h in arch.heads if h.prefix == "" for m in h.head_modules}
    return tuple(
        (_template_regex(t, prefix), t) for t in arch.modules if not (t.in_head and prefix == "" and t.path not in root_heads)
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


def family_from_evidence(class_name: str | None = None, model_type: str | None = None) -> Architecture | None:
    """The family a recorded transformers class or a config.json model_type names, if any."""
    for arch in ARCHITECTURES.values():
        if (class_name and arch.head_for_class(class_name)) or (model_type and model_type in arch.model_types):
            return arch
    return None


def detect_from_paths(
    paths: list[str] | tuple[str, ...],
    class_name: str | None = None,
    other_paths: list[str] | tuple[str, ...] = (),
    model_type: str | None = None,
) -> Detection:
    """Detect the architecture from module paths relative to the model root
    (e.g. "model.layers.0.self_attn.q_proj"). Module names give the naming scheme; the family
    comes from evidence: `class_name` (a transformers class such as "Qwen2ForCausalLM", when the
    adapter config records one, which also picks the head) or `model_type` (from the base's
    config.json). `other_paths` (modules_to_save and the like) only help to pick the head, or
    stand in for `paths` when there are none."""
    paths = list(paths) or list(other_paths)
    if not paths:
        return Detection(None, reason="no modules to detect from")
    evidence = family_from_evidence(class_name, model_type)
    # Only backbone modules count as evidence: head modules (lm_head, score, classifier) have
    # the same names in many families and would make anything with an lm_head look known.
    scores: dict[tuple[str, str], int] = {}  # (family, prefix) -> backbone modules matched
    for arch in ARCHITECTURES.values():
        for prefix in sorted({h.prefix for h in arch.heads}):
            refs = (locate(arch.name, prefix, p) for p in paths)
            n = sum(ref is not None and not ref.template.in_head for ref in refs)
            if n:
                scores[(arch.name, prefix)] = n
    if not scores:
        # No backbone module: the model class PEFT recorded (auto_mapping) is the only evidence left.
        head = evidence.head_for_class(class_name) if evidence is not None and class_name else None
        if head is not None:
            unmatched = tuple(p for p in paths if locate(evidence, head.prefix, p) is None)
            return Detection(evidence.name, head.name, head.prefix, reason=f"from the recorded class {class_name}",
                             unmatched=unmatched, family_known=True)
        return Detection(None, reason="no module path matches a known architecture's table")
    best = max(scores.values())
    candidates = [(name, prefix) for (name, prefix), n in scores.items() if n == best]  # in ARCHITECTURES order
    chosen = next(((n, p) for n, p in candidates if evidence is not None and n == evidence.name), None)
    reason, family_known = "", chosen is not None
    if chosen is None:
        families = sorted({n for n, _ in candidates}, key=list(ARCHITECTURES).index)
        if not _store_alike(candidates, paths):
            return Detection(None, reason=f"module names fit {' and '.join(families)}, which store these weights differently; "
                             "the base's config.json (model_type) or the recorded model class decides", ambiguous_layout=True)
        chosen = candidates[0]
        if len(families) > 1:
            reason = f"family not recorded; {', '.join(families)} name these modules alike"
        else:
            family_known = True
        if evidence is not None:
            reason = f"the recorded {class_name or model_type} does not fit these module names; " + (reason or "")
    name, prefix = chosen
    arch = ARCHITECTURES[name]
    unmatched = tuple(p for p in paths if locate(arch, prefix, p) is None)
    head = _pick_head(arch, prefix, paths + list(other_paths), class_name)
    return Detection(name, head.name, prefix, reason=reason.rstrip("; "), unmatched=unmatched, family_known=family_known)


def _store_alike(candidates: list[tuple[str, str]], paths: list[str]) -> bool:
    """True when every candidate (family, prefix) gives every path the same layout: then which
    of them it is cannot change a merge."""
    layouts = set()
    for name, prefix in candidates:
        refs = [locate(name, prefix, p) for p in paths]
        layouts.add(tuple(r.layout if r else None for r in refs))
    return len(layouts) == 1


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
    arch = family_from_evidence(model_type=model_type if isinstance(model_type, str) else None)
    if arch is None:
        return Detection(None, reason=f"config.json model_type {model_type!r} is not a known family")
    classes = config.get("architectures") or []
    head = next((h for c in classes if isinstance(c, str) and (h := arch.head_for_class(c)) is not None), None)
    if head is None:
        return Detection(arch.name, reason="head class not recorded in config.json", family_known=True)
    return Detection(arch.name, head.name, head.prefix, family_known=True)
