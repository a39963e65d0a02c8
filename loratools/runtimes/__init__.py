"""The serving runtimes `validate --target` knows, as data.

Each runtime is a table of rules read from its own loader: what it refuses, or serves differently
from PEFT, each with the release range it holds for and the source it was read from. The checker
(ops/serving.py) only evaluates them: a rule names one of its checks (`check`), gives that check
its data (`param`) and the text of the finding: what the runtime does (`does`) and the loratools
command that fixes it (`fix`), both formatted with the fields the check reports.

`--target vllm` means the newest release recorded, `--target vllm@0.31.0` an older one; a
runtime whose rules were read from one release only takes its bare name (or that release).
Nothing here imports numpy or torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError


@dataclass(frozen=True)
class Rule:
    code: str  # the finding's code, e.g. "vllm-scaling"
    check: str  # which check of ops/serving.py decides it
    severity: str  # "error" (refused or served wrong) | "warning" (needs a server flag, or may differ)
    does: str  # what the runtime does with such an adapter (a template over the check's fields)
    fix: str  # the loratools command (or the step) that fixes it, same template fields
    source: str  # the runtime's file(s) the rule was read from
    since: str | None = None  # first release it holds for; None: the oldest recorded
    until: str | None = None  # first release it no longer holds for; None: the newest recorded too
    param: Any = None  # the check's data (accepted names, rank limits, ...)


@dataclass(frozen=True)
class RankLimit:
    """What a runtime's --max-lora-rank accepts, and how it counts an adapter's rank."""

    values: tuple[int, ...] | None  # the values it accepts; None: any positive integer
    default: int | None  # when not given; None: the largest r of the adapters it starts with
    counts: str  # "r": the config's r; "r+modules": also every module's rank; "r+rank_pattern": r and rank_pattern's values


@dataclass(frozen=True)
class Option:
    """A server option that serving a set of adapters together needs."""

    flag: str  # e.g. "--max-lora-rank"
    needs: str  # "rank" | "modules"
    help: str  # what it does, for the report
    source: str
    since: str | None = None
    until: str | None = None
    param: Any = None  # "rank": the RankLimit


@dataclass(frozen=True)
class ExpertFamilies:
    """How a runtime reads LoRA on MoE experts, by the base's family (transformers model_type or
    model class, as the adapter or its base records it)."""

    fused: frozenset[str]  # families whose experts it holds 3-D and reads fused (target_parameters) LoRA for
    fused_labels: tuple[str, ...]  # the same, as messages name them
    pair: tuple[str, ...]  # the fused parameters it needs LoRA on together in every experts module


@dataclass(frozen=True)
class Runtime:
    name: str  # as --target spells it
    label: str  # as messages spell it
    releases: tuple[str, str] | None  # oldest and newest release the rules were read for; None: not versioned
    rules: tuple[Rule, ...]
    options: tuple[Option, ...] = ()
    read: tuple[str, ...] = field(default=())  # the releases whose sources were read


@dataclass(frozen=True)
class Target:
    """A runtime at one release, with the rules and options that hold for it."""

    runtime: Runtime
    version: str | None
    rules: tuple[Rule, ...]
    options: tuple[Option, ...]

    @property
    def name(self) -> str:
        return f"{self.runtime.name}@{self.version}" if self.version else self.runtime.name

    @property
    def label(self) -> str:
        return f"{self.runtime.label} {self.version}" if self.version else self.runtime.label


_VERSION = re.compile(r"^(\d+(?:\.\d+)*)(?:\.post(\d+))?$")


def version_key(version: str) -> tuple[int, ...]:
    """A release number as a comparable tuple: 0.11.1 < 0.11.1.post1 < 0.11.2 < 0.12.0."""
    m = _VERSION.match(version)
    if m is None:
        raise UsageError(f"--target: {version!r} is not a release number (like 0.31.0)")
    parts = [int(p) for p in m[1].split(".")]
    return (*parts, *[0] * (4 - len(parts)), int(m[2] or 0))


def holds(since: str | None, until: str | None, version: str | None) -> bool:
    if version is None:
        return True
    key = version_key(version)
    return (since is None or version_key(since) <= key) and (until is None or key < version_key(until))


def runtimes() -> dict[str, Runtime]:
    from . import llama_cpp, sglang, vllm

    return {r.name: r for r in (vllm.VLLM, sglang.SGLANG, llama_cpp.LLAMA_CPP)}


def target_forms() -> list[str]:
    """What --target accepts, for help and error messages."""
    return [form for r in runtimes().values() for form in ((r.name, f"{r.name}@VERSION") if _versioned(r) else (r.name,))]


def _versioned(runtime: Runtime) -> bool:
    return runtime.releases is not None and runtime.releases[0] != runtime.releases[1]


def resolve(target: str) -> Target:
    """`vllm`, `vllm@0.31.0`, `sglang`, `llama.cpp` as the rules that hold; UsageError otherwise."""
    name, _, version = target.partition("@")
    known = runtimes()
    runtime = known.get(name)
    if runtime is None:
        raise UsageError(f"--target must be one of {', '.join(target_forms())}, got {target!r}")
    if not version:
        version = runtime.releases[1] if runtime.releases else None
    elif runtime.releases is None:
        raise UsageError(f"--target {name} takes no version: its rules are not recorded per release")
    else:
        oldest, newest = runtime.releases
        if not holds(oldest, None, version) or version_key(version) > version_key(newest):
            span = f"{oldest} to {newest}" if oldest != newest else oldest
            raise UsageError(f"--target {target}: {runtime.label}'s rules are recorded for {span} only "
                             f"(--target {name} is {newest})")
    return Target(
        runtime,
        version,
        tuple(r for r in runtime.rules if holds(r.since, r.until, version)),
        tuple(o for o in runtime.options if holds(o.since, o.until, version)),
    )
