"""`loratools validate`: lint adapter files without loading a model; report every problem found.

Every check yields a Finding with a stable code, a severity and, where it applies, the module.
Nothing here raises for a broken adapter: problems are findings. The codes are listed (with how
to fix each) in the README.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from ..adapter import PREFIX, Adapter
from ..arch import ARCHITECTURES, Layout
from ..config import CONFIG_NAME, CONVERTIBLE_INITS, AdapterConfig, config_problems, pattern_value, refusals
from ..errors import LoraToolsError
from ..formats.checkpoint import Checkpoint, open_checkpoint
from ..formats.json_text import read_json_file
from ..adapter_dir.adalora import is_adalora
from ..adapter_dir.peft_dir import BIN_NAME, SAFETENSORS_NAME, read_adalora
from ..formats.tensors import SafetensorsStore, TensorStore, load_pickled_tensors, raw_values
from ..report import Report

ERROR, WARNING = "error", "warning"
NOTICE = "notice"  # what the user should know, never a failure (not even with --strict)

# Fields of PEFT's LoraConfig (0.21) and PeftConfig, plus keys older PEFT versions wrote.
KNOWN_CONFIG_KEYS = frozenset(
    """alora_invocation_tokens alpha_pattern arrow_config auto_mapping base_model_name_or_path bias corda_config
    ensure_weight_tying eva_config exclude_modules fan_in_fan_out inference_mode init_lora_weights kasa_config
    layer_replication layers_pattern layers_to_transform loftq_config lora_alpha lora_bias lora_dropout lora_ga_config
    megatron_config megatron_core modules_to_save monteclora_config peft_type peft_version qalora_group_size r
    rank_pattern revision runtime_config target_modules target_parameters task_type trainable_token_indices use_bdlora
    use_dora use_qalora use_rslora velora_config enable_lora merge_weights use_original_init""".split()
)

# `.lora_A.default.weight`: a key saved from the live model's state_dict, adapter name included.
_ADAPTER_NAME_IN_KEY = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)\.[^.]+(\.weight|\.bias)?$")


@dataclass
class Finding:
    code: str
    severity: str  # "error" | "warning" | "notice"
    module: str | None
    message: str


@dataclass
class Result:
    adapter: str
    findings: list[Finding]
    serving: dict | None = None  # with a target: what serving it needs (ops/serving.py check_target)

    @property
    def errors(self) -> int:
        return sum(f.severity == ERROR for f in self.findings)

    @property
    def warnings(self) -> int:
        return sum(f.severity == WARNING for f in self.findings)

    def ok(self, strict: bool = False) -> bool:
        return self.errors == 0 and (not strict or self.warnings == 0)


def validate(adapter_path: str | os.PathLike, base: Checkpoint | None = None, target: str | None = None) -> Result:
    """Every check on one adapter (a directory, or a file of it: its directory is checked).
    target: "vllm", "vllm@VERSION", "sglang" or "llama.cpp" adds what that runtime refuses or serves differently."""
    findings: list[Finding] = []
    add = lambda code, severity, message, module=None: findings.append(Finding(code, severity, module, message))  # noqa: E731
    path = Path(adapter_path)
    root = path if path.is_dir() else path.parent
    if not path.exists():
        add("not-found", ERROR, f"{adapter_path}: no such adapter directory or file")
        return Result(str(adapter_path), findings)

    raw = _check_config_file(root / CONFIG_NAME, add)
    store = _open_weights(root, add)
    if raw is None or store is None:
        return Result(str(adapter_path), findings)
    if is_adalora(raw):  # checked as its own format, then as the plain LoRA it equals
        adapter = read_adalora(raw, store, source=str(adapter_path), collect_problems=True)
    else:
        config = _check_config_fields(raw, add)
        if config is None:
            return Result(str(adapter_path), findings)
        adapter = Adapter(config, store, source=str(adapter_path), collect_problems=True)
    for module, problem in adapter.problems:
        add(problem.code, ERROR, str(problem), module)
    _check_keys(adapter, add)
    _check_config_against_weights(adapter, add)
    _check_values(adapter, add)
    if base is not None:
        _check_against_base(adapter, base, add)
        if not any(f.severity == ERROR for f in findings):
            _check_merge_plan(adapter, base, add)
    if target is not None:
        from .serving import check_target

        return Result(str(adapter_path), findings, check_target(adapter, target, add, ERROR, WARNING))
    return Result(str(adapter_path), findings)


# ---- files ----------------------------------------------------------------------------------


def _check_config_file(path: Path, add) -> dict | None:
    if not path.exists():
        add("config-missing", ERROR, f"no {CONFIG_NAME}: PEFT cannot load the adapter without it; save it with the weights")
        return None
    try:
        raw = read_json_file(path, code="config-json")  # only a regular file, at most 64 MiB
    except LoraToolsError as exc:
        add(exc.code, ERROR, f"{exc}; fix or re-save it")
        return None
    if not isinstance(raw, dict):
        add("config-json", ERROR, f"{CONFIG_NAME} must be a JSON object, not {type(raw).__name__}")
        return None
    return raw


def _open_weights(root: Path, add) -> TensorStore | None:
    if (root / SAFETENSORS_NAME).exists():  # a FIFO or device there is reported (not-a-file), not read
        try:
            return SafetensorsStore(root / SAFETENSORS_NAME)
        except LoraToolsError as exc:
            add(exc.code, ERROR, f"{exc}; the file is damaged: re-save or re-download it")
            return None
    if (root / BIN_NAME).exists():
        add("pickle-weights", WARNING, f"{BIN_NAME} is a pickle; read with weights_only=True. Re-save as safetensors")
        try:
            return load_pickled_tensors(root / BIN_NAME)
        except LoraToolsError as exc:  # pickle-refused, or not-a-file / io-error
            add(exc.code, ERROR, str(exc))
            return None
    add("weights-missing", ERROR, f"no {SAFETENSORS_NAME} (or {BIN_NAME}) beside {CONFIG_NAME}")
    return None


# ---- config ---------------------------------------------------------------------------------


def _check_config_fields(raw: dict, add) -> AdapterConfig | None:
    """The config's own problems (shared with AdapterConfig.from_dict) plus what only a linter
    reports; returns the parsed config when there is no error."""
    problems = config_problems(raw)
    for problem in problems:
        add(problem.code, ERROR, str(problem))
    targets = raw.get("target_modules")
    if targets in ([], "") and not raw.get("target_parameters"):
        add("config-target-modules", ERROR, "target_modules is empty: PEFT would adapt nothing; list the modules trained")
    for reason in refusals(raw, merging=True, convertible_init=False):
        # An error, not a warning: validate passing must mean the adapter merges.
        add("unsupported", ERROR, f"loads in PEFT, but loratools merge refuses it: {reason}")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(CONVERTIBLE_INITS):
        add("needs-initial", WARNING, f"init_lora_weights={init!r}: trained on a base PEFT rewrote at initialisation "
            "(W − s·B0·A0); on the original base it needs its initial adapter: merge/convert with --initial DIR, "
            "or serve it only with the rewritten base")
    for key in sorted(set(raw) - KNOWN_CONFIG_KEYS):
        add("config-unknown-key", WARNING, f"unknown config key {key!r} (a typo, or a newer PEFT?); PEFT may reject it")
    return None if problems else AdapterConfig.from_dict(raw)


def _check_config_against_weights(adapter: Adapter, add) -> None:
    cfg = adapter.config
    paths = [*adapter.modules, *adapter.experts]  # (a fused-experts module's patterns match its parameter's path)
    for name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(cfg, name):
            if not any(pattern_value({key: 1}, p, None) is not None for p in paths):
                add("pattern-unused", WARNING, f"{name} key {key!r} matches no module of the adapter; remove or fix it")
    arch = adapter.architecture
    conv1d = any(m.layout is Layout.CONV1D for m in adapter.modules.values())
    if conv1d and not cfg.fan_in_fan_out:
        add("fan-in-fan-out", WARNING, "the adapter targets GPT-2 Conv1D layers but fan_in_fan_out is false; PEFT forces it to true, set it")
    if cfg.fan_in_fan_out and arch and not any(t.layout is Layout.CONV1D for t in ARCHITECTURES[arch].modules):
        add("fan-in-fan-out", WARNING, f"fan_in_fan_out is true but {arch} has no Conv1D layers; PEFT resets it, set it to false")


# ---- tensors --------------------------------------------------------------------------------


def _check_keys(adapter: Adapter, add) -> None:
    for key in adapter.unknown_keys:
        if not key.startswith(PREFIX):
            add("key-prefix", ERROR, f"key {key!r} lacks the {PREFIX!r} prefix: PEFT silently ignores it and the adapter does nothing there")
        elif _ADAPTER_NAME_IN_KEY.search(key):
            add("key-adapter-name", ERROR, f"key {key!r} still contains an adapter name: PEFT does not load it and merge refuses it; save with save_pretrained (or get_peft_model_state_dict)")
        else:
            add("unknown-tensor", ERROR, f"tensor {key!r} is neither a LoRA part nor a known extra (modules_to_save, bias); remove it")


def _check_values(adapter: Adapter, add) -> None:
    """NaN/Inf anywhere, all-zero lora_B. Safetensors data is checked on its raw bits with numpy
    (no torch import, no dtype conversion); a legacy pickle is already in memory as tensors."""
    values = _values(adapter.tensors)
    for path, module in adapter.modules.items():
        for key in (k for k in (module.a_key, module.b_key, module.magnitude_key, module.lora_bias_key, module.diag_key) if k):
            finite, nonzero = values(key)
            if not finite:
                add("non-finite", ERROR, f"{key} contains NaN or Inf: training diverged or the file is corrupt", path)
            elif key == module.b_key and not nonzero:
                add("zero-lora-b", WARNING, f"lora_B of {path} is all zeros: this module is untrained (ΔW = 0)", path)
    for path, expert in adapter.experts.items():  # fused MoE experts (target_parameters)
        for key in (expert.a_key, expert.b_key):
            finite, nonzero = values(key)
            if not finite:
                add("non-finite", ERROR, f"{key} contains NaN or Inf: training diverged or the file is corrupt", path)
            elif key == expert.b_key and not nonzero:
                add("zero-lora-b", WARNING, f"lora_B of {path} is all zeros: these {expert.num_experts} experts are untrained "
                    "(ΔW = 0)", path)
    for key, target in [(e.key, e.target) for e in adapter.extras] + [(t.key, t.target) for t in adapter.trainable_tokens]:
        meta = adapter.tensors.meta(key)
        if meta.dtype not in ("float16", "bfloat16", "float32", "float64"):
            add("non-float-tensor", ERROR, f"{key} has dtype {meta.dtype}; expected floating point", target)
        elif not values(key)[0]:
            add("non-finite", ERROR, f"{key} contains NaN or Inf", target)


def _values(store: TensorStore):
    if isinstance(store, SafetensorsStore):
        return lambda key: raw_values(store, key)

    def check(key: str) -> tuple[bool, bool]:
        tensor = store.get(key)
        return store.finite(key), bool(tensor.any())

    return check


def _check_against_base(adapter: Adapter, base: Checkpoint, add) -> None:
    from .basemap import BaseNameMapper, adapter_for_base, unmergeable_dtype

    try:
        adapter = adapter_for_base(base, adapter)
    except LoraToolsError as exc:
        add(exc.code, ERROR, str(exc))
        return
    if _vocabulary_resized(adapter, base, add):
        return
    mapper = BaseNameMapper(base, adapter)
    for path, module in adapter.modules.items():
        try:
            name = mapper.find(f"{path}.weight", f"module {path}", lm_head=module.role is not None and module.role.value == "lm_head")
        except LoraToolsError as exc:
            add("base-missing-module", ERROR, str(exc), path)
            continue
        problem = unmergeable_dtype(base.info(name))
        if problem:
            add("base-dtype", ERROR, f"module {path}: base {name} is {problem}", path)
            continue
        have = tuple(base.info(name).shape)
        if have != module.weight_shape:
            code = "base-vocab-size" if module.layout is Layout.EMBEDDING else "base-shape"
            add(code, ERROR, f"{path}: the adapter needs {name} of shape {list(module.weight_shape)}, the base has {list(have)}", path)
    for extra in adapter.extras:
        name = mapper.find(extra.target, extra.kind, required=False)
        if name is None:
            add("base-missing-module", ERROR, f"{extra.kind} tensor {extra.key}: no {extra.target} in the base", extra.target)
        elif tuple(base.info(name).shape) != adapter.tensors.meta(extra.key).shape:
            want, have = list(adapter.tensors.meta(extra.key).shape), list(base.info(name).shape)
            add("base-shape", ERROR, f"{extra.kind} tensor {extra.key} has shape {want}, the base's {name} is {have}", extra.target)


def _vocabulary_resized(adapter: Adapter, base: Checkpoint, add) -> bool:
    """An adapter trained with added tokens (ops/merge/vocab.py): merge's own plan decides, so the
    shape checks below (which would see another vocabulary) are skipped. A notice when merge takes
    it, else merge's reason (`base-vocab-size`: a token tensor whose added rows it does not save)."""
    from .base_report import vocabulary_line
    from .merge import plan_merge
    from .merge.vocab import CODE

    try:
        plan = plan_merge(base, adapter)
    except LoraToolsError as exc:
        if exc.code != CODE:
            return False
        add(CODE, ERROR, str(exc))
        return True
    if plan.vocab_resized is None:
        return False
    add("vocab-resized", NOTICE, vocabulary_line({"base": plan.vocab_resized[0], "adapter": plan.vocab_resized[1]}))
    return True


def _check_merge_plan(adapter: Adapter, base: Checkpoint, add) -> None:
    """What the checks above do not see, merge's own plan does (trainable token rows beyond the
    vocabulary, lora_bias without a base bias, tied-weight conflicts...): run it, so that an
    adapter validate passes against a base is one merge takes."""
    from .merge import plan_merge

    try:
        plan_merge(base, adapter)
    except LoraToolsError as exc:
        add(exc.code if exc.code not in ("error", "shape", "config", "format") else "base-merge", ERROR, str(exc))


# ---- many adapters --------------------------------------------------------------------------


def adapter_dirs(paths: Iterable[str | os.PathLike]) -> list[str]:
    """The adapters named by paths: a file stands for its directory; each directory once."""
    seen: dict[str, None] = {}
    for p in paths:
        path = Path(p)
        key = str(path.parent if path.is_file() else path)
        seen.setdefault(key, None)
    return list(seen)


def validate_many(paths: Iterable[str | os.PathLike], base: Checkpoint | str | os.PathLike | None = None,
                  target: str | None = None) -> list[Result]:
    checkpoint = open_checkpoint(base) if base is not None and not isinstance(base, Checkpoint) else base
    return [validate_guarded(p, checkpoint, target) for p in adapter_dirs(paths)]


def validate_guarded(path: str | os.PathLike, base: Checkpoint | None = None, target: str | None = None) -> Result:
    """validate(), with any error it did not turn into a finding reported as one: one broken
    adapter never hides the results of the others."""
    try:
        return validate(path, base, target)
    except LoraToolsError as exc:
        return Result(str(path), [Finding(exc.code, ERROR, None, str(exc))])
    except (Exception, RecursionError) as exc:  # a check that failed to anticipate this input
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return Result(str(path), [Finding("internal-error", ERROR, None, f"unexpected {type(exc).__name__}: {first}")])


@dataclass
class ValidateReport(Report):
    results: list[Result]
    strict: bool = False  # warnings fail too
    base: Checkpoint | None = None  # checked against this base

    @property
    def ok(self) -> bool:
        return all(r.ok(self.strict) for r in self.results)

    def _json(self) -> dict[str, Any]:
        from .base_report import base_summary
        from .serving import serving_set

        return {
            "base": base_summary(self.base) if self.base is not None else None,
            "results": [
                {"adapter": r.adapter, "ok": r.ok(self.strict), "findings": [asdict(f) for f in r.findings]} for r in self.results
            ],
            "summary": {
                "adapters": len(self.results),
                "ok": sum(r.ok(self.strict) for r in self.results),
                "failed": sum(not r.ok(self.strict) for r in self.results),
                "errors": sum(r.errors for r in self.results),
                "warnings": sum(r.warnings for r in self.results),
                "strict": self.strict,
            },
            "serving": serving_set(r.serving for r in self.results),
        }

    def render(self) -> str:
        from .base_report import base_summary, render_base
        from .serving import render_serving, serving_set

        lines = [render_base(base_summary(self.base))] if self.base is not None else []
        for r in self.results:
            status = "ok" if r.ok(self.strict) else "FAIL"
            counts = f"{r.errors} error(s), {r.warnings} warning(s)"
            lines.append(f"{status:<5}{r.adapter}: {counts}")
            for severity in (ERROR, WARNING, NOTICE):
                for f in (f for f in r.findings if f.severity == severity):
                    lines.append(f"  {severity:<8}{f.code:<22}{f.message}")
        serving = serving_set(r.serving for r in self.results)
        lines += [render_serving(serving)] if serving else []
        ok = sum(r.ok(self.strict) for r in self.results)
        lines.append(f"{ok} of {len(self.results)} adapter(s) valid{' (strict: warnings fail)' if self.strict else ''}")
        return "\n".join(lines)
