"""Mixture-of-experts layers: the fused 3-D expert parameters transformers 5 holds in memory
(what a `target_parameters` LoRA adapter is trained on), and the tensors checkpoints store them
as on disk. The same facts as transformers' conversion_mapping.py (its WeightConverters with
MergeModulelist + Concatenate, and the WeightRenamings of the experts module), as data:
tests/test_moe_tables.py holds this table against transformers' own mapping.

A fused parameter holds one (d1, d2) slice per expert: (E, d1, d2). On disk it is either
- per expert: one tensor per expert and part, the parts concatenated along d1 in the order listed
  (transformers: MergeModulelist(dim=0) stacks the experts, Concatenate(dim=1) joins gate and up),
  each stored as its slice of the expert's (d1, d2) (no transposition); or
- fused, the parameter itself under its in-memory name (`parts` empty: gpt_oss).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .roles import Role

EXPERT = "*"  # in an on-disk name: the expert's index
_ONE_EXPERT = re.compile(r"\.experts\.\d+\.")


def is_per_expert(path: str) -> bool:
    """Whether a module path is inside one expert's module (transformers 4's per-expert Linears,
    `...experts.N.<proj>` as checkpoints name them), not a fused parameter of all experts."""
    return _ONE_EXPERT.search(path + ".") is not None


@dataclass(frozen=True)
class Part:
    leaf: str  # the per-expert tensor's name below the experts module: "gate_proj.weight"
    role: Role


@dataclass(frozen=True)
class FusedParameter:
    name: str  # the parameter's leaf name in memory: "gate_up_proj"
    role: Role
    parts: tuple[Part, ...]  # on disk, in concatenation order along d1; () when stored fused, as in memory


@dataclass(frozen=True)
class ExpertsLayout:
    """One family of experts modules."""

    name: str
    model_types: tuple[str, ...]  # the keys of transformers' mapping this layout is (model_type or class name)
    module: str  # the experts module in memory, relative to a decoder layer: "mlp.experts"
    disk_module: str  # the name checkpoints store it under (transformers renames it on load and back on save)
    parameters: tuple[FusedParameter, ...]  # in the module's registration order: PEFT nests its wrappers so
    # (E, in, out) for x @ W (transformers' `is_transposed` experts); else (E, out, in) for F.linear.
    # PEFT's ParamWrapper follows it: A is (r·E, d2) and B (d1, r·E) unless transposed.
    transposed: bool = False

    def disk_name(self, layer_prefix: str, part: Part, expert: int) -> str:
        return f"{layer_prefix}{self.disk_module}.{expert}.{part.leaf}"


def _gated(names: tuple[str, str, str]) -> tuple[FusedParameter, ...]:
    """gate_up_proj = [gate; up] per expert and down_proj = down: the layout of nearly every family."""
    gate, up, down = names
    return (
        FusedParameter("gate_up_proj", Role.EXPERT_GATE_UP,
                       (Part(f"{gate}.weight", Role.EXPERT_GATE), Part(f"{up}.weight", Role.EXPERT_UP))),
        FusedParameter("down_proj", Role.EXPERT_DOWN, (Part(f"{down}.weight", Role.EXPERT_DOWN),)),
    )


PROJ, W = ("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")  # the two spellings of gate, up, down

LAYOUTS: tuple[ExpertsLayout, ...] = (
    ExpertsLayout("qwen2_moe", (
        "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text",
        "qwen3_5_moe_text", "qwen4_exp_text", "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_ocr2", "dots1",
        "Dots3NoteTextModel", "ernie4_5_moe", "exaone_moe", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm_moe_dsa",
        "glm5_next", "glm5_next_text", "longcat_flash", "hunyuan_v1_moe", "hy_v3", "flex_olmo", "olmoe", "cohere2_moe",
        "solar_open", "mellum", "beam", "afmoe", "axk1", "axk2", "kimi_k25", "bailing_hybrid", "kolibri1",
        "mimo_v2_flash", "flint", "laguna", "UnlimitedOcrTextModel",
    ), "mlp.experts", "mlp.experts", _gated(PROJ)),
    ExpertsLayout("mixtral", ("mixtral", "minimax", "minimax_m2", "minimax_m3_vl", "phimoe", "kimi_linear"),
                  "mlp.experts", "block_sparse_moe.experts", _gated(W)),
    ExpertsLayout("deepseek_v4", ("deepseek_v4",), "mlp.experts", "ffn.experts", _gated(W)),
    ExpertsLayout("mistral_large4_text", ("mistral_large4_text",), "mlp.experts", "experts", _gated(W)),
    ExpertsLayout("dots3_note_vision_encoder", ("dots3_note_vision_encoder",), "mlp.experts", "mlp.experts",
                  _gated(("fc1", "fc3", "fc2"))),
    ExpertsLayout("lfm2_moe", ("lfm2_moe",), "feed_forward.experts", "feed_forward.experts", _gated(W)),
    ExpertsLayout("jamba", ("jamba",), "feed_forward.experts", "feed_forward.experts", _gated(PROJ)),
    # non-gated experts: up and down only
    ExpertsLayout("nemotron_h", ("nemotron_h",), "mixer.experts", "mixer.experts", (
        FusedParameter("up_proj", Role.EXPERT_UP, (Part("up_proj.weight", Role.EXPERT_UP),)),
        FusedParameter("down_proj", Role.EXPERT_DOWN, (Part("down_proj.weight", Role.EXPERT_DOWN),)),
    )),
    # gpt_oss checkpoints store the experts as in memory: gate_up_proj (E, hidden, 2·inter), gate and
    # up interleaved along its last dim, down_proj (E, inter, hidden), with biases beside.
    ExpertsLayout("gpt_oss", ("gpt_oss",), "mlp.experts", "mlp.experts", (
        FusedParameter("gate_up_proj", Role.EXPERT_GATE_UP, ()),
        FusedParameter("down_proj", Role.EXPERT_DOWN, ()),
    ), transposed=True),
    # Llama 4 checkpoints store the experts as in memory too: gate_up_proj (E, hidden, 2·inter), gate
    # then up along its last dim, down_proj (E, inter, hidden); its experts module has no
    # `is_transposed`, so PEFT's ΔW_e = s·B_e·A_e is the (d1, d2) slice itself.
    ExpertsLayout("llama4", ("llama4_text", "llama4"), "feed_forward.experts", "feed_forward.experts", (
        FusedParameter("gate_up_proj", Role.EXPERT_GATE_UP, ()),
        FusedParameter("down_proj", Role.EXPERT_DOWN, ()),
    )),
)

BY_MODEL_TYPE: dict[str, ExpertsLayout] = {t: layout for layout in LAYOUTS for t in layout.model_types}

# Where the family is not known: every family above registers gate_up_proj (or up_proj) before down_proj.
DEFAULT_ORDER = ("gate_up_proj", "up_proj", "down_proj")


def layout_for(model_type: str | None) -> ExpertsLayout | None:
    return BY_MODEL_TYPE.get(model_type) if model_type else None


def parameter_order(model_type: str | None) -> tuple[str, ...]:
    """The experts module's parameter names in registration order."""
    layout = layout_for(model_type)
    return tuple(p.name for p in layout.parameters) if layout else DEFAULT_ORDER


@dataclass(frozen=True)
class Placement:
    """Where expert `expert`'s slice of a fused parameter is stored: on-disk tensor `names` (the
    first that the checkpoint has), holding rows `rows` (start, stop) of the expert's (d1, d2)
    slice, all of d2. `stacked`: that tensor is the fused (E, d1, d2) parameter itself, expert
    e's slice at rows e·d1… of its (E·d1, d2) view."""

    names: tuple[str, ...]
    role: Role
    expert: int
    rows: tuple[int, int]
    stacked: bool = False


def placements(layout: ExpertsLayout, parameter_path: str, num_experts: int, d1: int) -> list[Placement] | None:
    """Every on-disk tensor that the experts' slices of `parameter_path` (in memory, e.g.
    "model.layers.3.mlp.experts.gate_up_proj", (E, d1, d2)) are stored in; None when the family has
    no such parameter there, or its parts do not divide d1."""
    module, _, leaf = parameter_path.rpartition(".")
    fused = next((p for p in layout.parameters if p.name == leaf), None)
    if fused is None or not (module == layout.module or module.endswith("." + layout.module)):
        return None
    prefix = module[: len(module) - len(layout.module)]
    if not fused.parts:
        return [Placement((parameter_path,), fused.role, e, (0, d1), stacked=True) for e in range(num_experts)]
    if d1 % len(fused.parts):
        return None
    step = d1 // len(fused.parts)
    return [
        # the on-disk name first; the in-memory module name too, which transformers also loads
        Placement(tuple(dict.fromkeys((layout.disk_name(prefix, part, e), f"{module}.{e}.{part.leaf}"))),
                  part.role, e, (k * step, (k + 1) * step))
        for e in range(num_experts) for k, part in enumerate(fused.parts)
    ]
