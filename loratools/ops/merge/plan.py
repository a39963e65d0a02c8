"""The first phase of a merge: map an adapter onto a base checkpoint and make every check that
can be made before writing (headers, and the adapter's own values, which are small). No torch:
`validate --base` runs the same plan, so an adapter it passes is one merge takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from ...adapter import Adapter, ExpertModule, LoraModule, TrainableTokens
from ...arch import Layout, Role
from ...arch import experts as moe
from ...errors import FormatError, ShapeError, UnsupportedError, UsageError
from ...formats.checkpoint import Checkpoint
from ...formats.dtypes import CODE_OF_NAME as DTYPE_CODES
from ...formats.dtypes import FLOAT_CODES, HELD
from ...report import Report
from .. import dequant
from ..basemap import BaseNameMapper, adapter_for_base, unmergeable_dtype
from ..initial import check_on_base
from .bounds import require_finite_merge
from .vocab import AddedTokens


@dataclass
class TensorOps:
    """What happens to one base tensor: an optional replacement, then additive updates."""

    replace_key: str | None = None  # adapter key whose tensor replaces the base tensor
    rows: list[TrainableTokens] = field(default_factory=list)  # rows replaced (trainable_token_indices)
    modules: list[LoraModule] = field(default_factory=list)  # add s·ΔW (DoRA: renormalise)
    lora_biases: list[LoraModule] = field(default_factory=list)  # add s·lora_B.bias


# What the executor does to make one output tensor:
ACTIONS = {
    "copy": "the stored bytes, copied as they are (in the kernel: copy_file_range)",
    "cast": "the stored values converted into another dtype (--dtype)",
    "dequantize": "a quantized weight decoded and written in its output dtype",
    "merge": "changed by the adapter: W + ΔW (DoRA, KaSA, lora_bias, trainable-token rows)",
    "replace": "replaced outright by a tensor the adapter saved (modules_to_save, saved embeddings)",
    "requantize": "a changed FP8 weight, or its scales, quantized again (--keep-quantized)",
}
KERNELS = ("numpy", "torch")  # what computes a cast/merge/replace/requantize (kernel_numpy.py, kernel_torch.py)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of OUT, as the plan decides it: the executor writes exactly these, doing what
    `action` says with `kernel`; nothing about a tensor is decided after planning."""

    name: str
    dtype: str  # dtype code it is written in
    shape: tuple[int, ...]
    source: str  # the base tensor it is made from: itself, the embedding an untied head was tied to, or MXFP4 blocks
    action: str = "copy"  # a key of ACTIONS
    kernel: str | None = None  # one of KERNELS where values are computed; None for copy and plain dequantize
    held: str | None = None  # the dtype code the values are computed from (stored, or dequantized into)
    quantized: str | None = None  # the quantized weight it is decoded from, or quantized into with its scales
    feeds: tuple[str, ...] = ()  # the adapter tensors that change it, in the order they are applied

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


@dataclass
class MergePlan:
    base: Checkpoint
    adapter: Adapter
    ops: dict[str, TensorOps]  # output tensor name -> ops
    scale: float
    out_dtype: str | None  # --dtype's code, or None to keep each tensor's
    keep_quantized: bool = False  # write changed quantized weights quantized again (FP8), not dequantized
    untied: dict[str, str] = field(default_factory=dict)  # head written as its own tensor -> the embedding it was tied to
    outputs: dict[str, list[OutputTensor]] = field(default_factory=dict)  # shard -> its tensors in OUT, in file order
    device: str = "cpu"  # where computed tensors are computed: it decides their kernels
    vocab_resized: tuple[int, int] | None = None  # (base rows, the adapter's) of a resized vocabulary (vocab.py)
    reshaped: dict[str, tuple[int, ...]] = field(default_factory=dict)  # token tensors in the adapter's shape

    def on_device(self, device: str) -> "MergePlan":
        """The same plan computed on `device` ("cpu" or a torch device string): on a GPU every
        computed tensor goes through torch."""
        if device == self.device:
            return self
        return replace(self, device=device, outputs=_outputs(self.base, self.ops, self.out_dtype, self.keep_quantized,
                                                             self.untied, device, self.reshaped))

    def to_dict(self) -> dict:
        """The plan as data (`merge --dry-run --json`)."""
        return {"base": str(self.base.path), "adapter": str(self.adapter.source), "scale": self.scale,
                "dtype": self.out_dtype, "keep_quantized": self.keep_quantized, "device": self.device,
                "untied": dict(self.untied),
                "shards": {shard: [out.to_dict() for out in outs] for shard, outs in self.outputs.items()}}


@dataclass
class PlanReport(Report):
    """`merge --dry-run`: the plan, nothing written."""

    plan: MergePlan
    out: str

    def _json(self) -> dict:
        return {**self.plan.to_dict(), "out": self.out, "dry_run": True}

    def render(self) -> str:
        outs = [o for outputs in self.plan.outputs.values() for o in outputs]
        counts = {action: sum(o.action == action for o in outs) for action in ACTIONS}
        lines = [f"would write {self.out}: {len(outs)} tensors in {len(self.plan.outputs)} shard(s) on {self.plan.device}: "
                 + ", ".join(f"{n} {action}" for action, n in counts.items() if n)]
        for o in outs:
            if o.action not in ("copy", "cast"):
                source = "" if o.source == o.name else f" (from {o.source})"
                lines.append(f"  {o.action:<10} {o.kernel or '-':<5} {o.held or '-':>4} -> {o.dtype:<4} {o.name}{source}"
                             + (f"  <- {len(o.feeds)} adapter tensor(s)" if o.feeds else ""))
        return "\n".join(lines)


def plan_merge(base: Checkpoint, adapter: Adapter, scale: float = 1.0, dtype: str | None = None,
               keep_quantized: bool = False, device: str = "cpu") -> MergePlan:
    """Map the adapter onto the base and check everything that can be checked from headers
    (and the adapter's own values, which are small): every refusal happens here.
    A quantized base is dequantized: the output is bfloat16 unless `dtype` says otherwise."""
    if dtype is not None and dtype not in DTYPE_CODES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPE_CODES)}, got {dtype!r}")
    if keep_quantized:
        _check_keep_quantized(base)
    elif base.quantized and dtype is None:
        dtype = "bfloat16"  # one precision for the whole dequantized model
    if not math.isfinite(scale):
        raise UsageError(f"--scale must be a finite number, got {scale}")
    adapter.require_supported("merge", merging=True, experts=True, conv=True)
    check_on_base(base, adapter)  # --initial: the initial adapter's values against the base weights
    adapter = _adapter_for(base, adapter)
    if scale != 1.0:
        for module in adapter.modules.values():
            if module.magnitude_key or module.diag_key:
                what = "DoRA" if module.magnitude_key else "KaSA (it truncates the base weight)"
                raise UnsupportedError(f"--scale other than 1 is not defined for {what}: its merge is not additive")
        if adapter.extras or adapter.trainable_tokens:
            kinds = ", ".join(sorted({e.kind for e in adapter.extras} | ({"trainable tokens"} if adapter.trainable_tokens else set())))
            raise UnsupportedError(f"--scale other than 1 cannot scale tensors that replace base tensors ({kinds})")
    if not adapter.modules and not adapter.experts and not adapter.extras and not adapter.trainable_tokens:
        raise ShapeError("the adapter has no LoRA modules and no extra tensors: nothing to merge")
    _require_finite(adapter)
    mapper = BaseNameMapper(base, adapter)
    heads = _TiedHeads(base, adapter, mapper)
    added = AddedTokens(mapper)
    ops: dict[str, TensorOps] = {}
    for extra in adapter.extras:
        name = _extra_target(heads, mapper, extra)
        want, have = adapter.tensors.meta(extra.key).shape, base.info(heads.source(name)).shape
        if want != have and not added.replaces(name, heads.source(name), tuple(want), tuple(have)):
            raise ShapeError(f"{extra.kind} tensor {extra.key}: shape {list(want)} but base {name} is {list(have)}")
        op = ops.setdefault(name, TensorOps())
        if op.replace_key is not None and not adapter.tensor(op.replace_key).equal(adapter.tensor(extra.key)):
            raise UnsupportedError(f"{op.replace_key} and {extra.key} both replace base {name} (tied weights) with different values")
        op.replace_key = extra.key
    for tokens in adapter.trainable_tokens:
        name = mapper.find(tokens.target, f"trainable tokens of {tokens.path}")
        have, dim = base.info(name).shape, adapter.tensors.meta(tokens.key).shape[1]
        if len(have) != 2 or have[1] != dim or max(tokens.indices, default=-1) >= have[0]:
            raise ShapeError(f"trainable tokens of {tokens.path}: {len(tokens.indices)} rows of width {dim} up to token "
                             f"{max(tokens.indices, default=0)} do not fit base {name} of shape {list(have)}")
        ops.setdefault(name, TensorOps()).rows.append(tokens)
    for module in adapter.modules.values():
        name = heads.target(f"{module.path}.weight", f"module {module.path}", lm_head=module.role is Role.LM_HEAD)
        info = base.info(heads.source(name))
        if unmergeable_dtype(info):
            raise UnsupportedError(f"module {module.path}: base {name} is {unmergeable_dtype(info)}", code="base-dtype")
        if tuple(info.shape) != module.weight_shape and not added.takes(module, name, heads.source(name), tuple(info.shape)):
            raise ShapeError(
                f"module {module.path}: adapter expects {name} of shape {list(module.weight_shape)} "
                f"({module.layout.value}), base has {list(info.shape)}"
            )
        if module.diag_key and (module.layout is not Layout.LINEAR or module.kernel or module.rank >= min(info.shape)):
            raise UnsupportedError(f"module {module.path}: KaSA needs an nn.Linear with r < min(in, out) (PEFT's own condition)")
        ops.setdefault(name, TensorOps()).modules.append(module)
        if module.lora_bias_key:
            bias = mapper.find(f"{module.path}.bias", f"lora_bias of {module.path}", required=False)
            if bias is None:
                raise ShapeError(f"module {module.path}: lora_bias=True but the base layer has no bias (PEFT cannot merge it either)")
            ops.setdefault(bias, TensorOps()).lora_biases.append(module)
    for expert in adapter.experts.values():
        _place_experts(base, adapter, mapper, expert, ops)
    heads.untie_saved_embedding(ops)
    for name, op in ops.items():
        _drop_tied_copy(adapter, name, op)
        nonadditive = [m.path for m in op.modules if m.magnitude_key or m.diag_key]
        if op.rows and (op.modules or op.replace_key):
            raise UnsupportedError(f"base {name} gets trainable tokens and another change (tied weights?); loratools does not combine them")
        if nonadditive and len(op.modules) > 1:
            raise UnsupportedError(f"base {name} is changed by {len(op.modules)} modules, one of them DoRA/KaSA ({nonadditive[0]}), "
                                   "whose merge depends on the order (tied weights?)")
    if keep_quantized:
        for name in ops:
            weight = base.quantized.get(name)
            if weight and any(base.weight_map[p] != base.weight_map[name] for p in weight.parts.values()):
                raise UnsupportedError(f"--keep-quantized: {name} and its scales are in different shards; merge without it",
                                       code="quantized-base")
    out_dtype = DTYPE_CODES[dtype] if dtype else None
    plan = MergePlan(base, adapter, ops, scale, out_dtype, keep_quantized, heads.untied,
                     _outputs(base, ops, out_dtype, keep_quantized, heads.untied, device, added.rows),
                     device, reshaped=dict(added.rows))
    added.finish(plan, heads.untied)
    for checked in heads.by_base_tensor(plan):  # the bound check finds each changed tensor in the base by name
        require_finite_merge(checked)
    return plan


def _place_experts(base: Checkpoint, adapter: Adapter, mapper: BaseNameMapper, expert: ExpertModule,
                   ops: dict[str, TensorOps]) -> None:
    """Each expert's ΔW_e where the base stores it, as transformers' conversion does
    (arch/experts.py): one fused module feeds E tensors (2·E for gate and up), each through a view
    of its factors (Adapter.expert_slice)."""
    model_type = (base.config or {}).get("model_type")
    layout = moe.layout_for(model_type)
    if layout is None:
        why = "the base has no config.json" if not base.config else f"loratools has no experts layout for model_type {model_type!r}"
        raise UnsupportedError(f"module {expert.path}: LoRA on fused MoE experts is placed by the base's family, and {why}",
                               code="fused-experts")
    d1, d2 = expert.expert_shape(layout.transposed)
    places = moe.placements(layout, expert.path, expert.num_experts, d1)
    if places is None:
        raise ShapeError(f"module {expert.path}: {layout.name} experts have no such parameter (or its parts do not "
                         f"divide its {d1} rows)", code="base-missing-module")
    for place in places:
        what = f"module {expert.path}, expert {place.expert}"
        name = next(filter(None, (mapper.find(n, what, required=False) for n in place.names)), None)
        if name is None:
            raise ShapeError(f"{what}: no tensor {place.names[0]} in the base checkpoint (wrong base model?)",
                             code="base-missing-module")
        info = base.info(name)
        if unmergeable_dtype(info):
            raise UnsupportedError(f"{what}: base {name} is {unmergeable_dtype(info)}", code="base-dtype")
        module = adapter.expert_slice(expert, place.expert, place.rows, layout.transposed, stacked=place.stacked)
        want = (expert.num_experts, d1, d2) if place.stacked else module.weight_shape
        if tuple(info.shape) != want:
            raise ShapeError(f"{what}: adapter expects {name} of shape {list(want)} (rows "
                             f"{place.rows[0]}:{place.rows[1]} of the expert's {[d1, d2]} in {expert.path}), "
                             f"base has {list(info.shape)}", code="base-shape")
        ops.setdefault(name, TensorOps()).modules.append(module)


def _extra_target(heads: "_TiedHeads", mapper: BaseNameMapper, extra) -> str:
    """The output tensor an extra replaces. A layer saved by save_embedding_layers is loaded by
    PEFT into the model's own parameter: a tied head's copy into the shared tensor (no untying)."""
    if extra.kind == "embedding_layer":
        return mapper.find(extra.target, f"saved embedding layer {extra.key}")
    return heads.target(extra.target, f"{extra.kind} tensor {extra.key}")


def _outputs(base: Checkpoint, ops: dict[str, TensorOps], out_dtype: str | None, keep_quantized: bool,
             untied: dict[str, str], device: str,
             reshaped: dict[str, tuple[int, ...]] | None = None) -> dict[str, list[OutputTensor]]:
    """Every tensor of OUT, shard by shard in file order, with the dtype it is written in and
    what makes it. --dtype casts the model's float tensors. With keep_quantized a quantized
    weight keeps its stored format (FP8 codes; a changed one quantized again) and so do its
    float32 scales, which are not the model's floats; otherwise it is written dequantized and its
    scales and code maps are dropped. An untied head follows the embedding it is made from;
    a token tensor in `reshaped` is written in the adapter's shape (a resized vocabulary)."""
    head_of = {embed: head for head, embed in untied.items()}
    requantized = {}  # keep_quantized: every stored tensor of a changed quantized weight -> that weight
    if keep_quantized:
        for name in ops:
            if name in base.quantized:
                requantized.update({part: name for part in base.quantized[name].parts.values()} | {name: name})
    # MXFP4: the weight is written under its own name where its blocks are stored (its scales dropped)
    named = {w.stored: w.name for w in base.quantized.values() if w.stored != w.name}
    outputs = {}
    for shard, header in base.shards.items():
        entries = []
        for stored_name in sorted(header.tensors, key=lambda n: header.tensors[n].start):  # sequential reads
            name = named.get(stored_name, stored_name)
            stored = header.tensors[stored_name]
            if keep_quantized and (name in base.quantized or name in base.quant_parts):
                dtype = stored.dtype
            elif name in base.quant_parts:
                continue
            else:
                stored = base.info(name)  # a quantized weight: its dequantized dtype and shape
                dtype = out_dtype if out_dtype and stored.dtype in FLOAT_CODES else stored.dtype
            stored_shape, reshaped = tuple(stored.shape), reshaped or {}
            shape = reshaped.get(name, stored_shape)
            decoded = name in base.quantized and not keep_quantized
            entries.append(_output(base, ops, name, stored_name, dtype, shape, decoded, requantized.get(name), device))
            if name in head_of:  # (plan_merge refuses to untie a quantized embedding)
                entries.append(_output(base, ops, head_of[name], name, dtype, reshaped.get(head_of[name], stored_shape), False,
                                       None, device))
        outputs[shard] = entries
    return outputs


def _output(base: Checkpoint, ops: dict[str, TensorOps], name: str, source: str, dtype: str, shape: tuple[int, ...],
            decoded: bool, requantized: str | None, device: str) -> OutputTensor:
    """What makes output tensor `name` (from base tensor `source`)."""
    op = ops.get(name)
    if requantized is not None:  # merged in float32, then quantized again with its new scales
        weight = base.quantized[requantized]
        held = dequant.value_dtype(weight)
        kernel = kernel_for(ops[requantized], held, "F32", tuple(weight.shape), device)
        return OutputTensor(name, dtype, shape, source, "requantize", kernel, held, requantized,
                            _feeds(ops[requantized]) if name == requantized else ())
    quantized = name if decoded else None
    held = dequant.value_dtype(base.quantized[name]) if quantized else base.shards[base.weight_map[source]].tensors[source].dtype
    if op is None:
        if quantized:  # decoded into its own dtype, rounded by the numpy store if another is asked for
            return OutputTensor(name, dtype, shape, source, "dequantize", None if held == dtype else "numpy", held, quantized)
        if dtype == held:
            return OutputTensor(name, dtype, shape, source, "copy")
        return OutputTensor(name, dtype, shape, source, "cast", "torch", held)
    action = "replace" if op.replace_key and not (op.modules or op.lora_biases or op.rows) else "merge"
    return OutputTensor(name, dtype, shape, source, action, kernel_for(op, held, dtype, shape, device), held, quantized,
                        _feeds(op))


def kernel_for(op: TensorOps, held: str, dtype: str, shape: tuple[int, ...], device: str) -> str:
    """numpy for additive low-rank updates of a 2-D bf16/f16/f32 weight on CPU (or of one storing
    all experts, (E, d1, d2), seen as (E·d1, d2)), torch never imported for them; torch for
    everything else (DoRA, KaSA, rows, lora_bias, replacements, other dtypes, a GPU)."""
    numpy = (
        device == "cpu" and held in HELD and dtype in HELD and (len(shape) == 2 or all(m.expert for m in op.modules))
        and bool(op.modules) and op.replace_key is None and not op.rows and not op.lora_biases
        and all(m.diag_key is None and m.magnitude_key is None for m in op.modules)
    )
    return "numpy" if numpy else "torch"


def _feeds(op: TensorOps) -> tuple[str, ...]:
    keys = [op.replace_key] if op.replace_key else []
    keys += [t.key for t in op.rows]
    keys += [k for m in op.modules for k in (_cut_keys(m) if m.expert else (m.a_key, m.b_key, m.magnitude_key, m.diag_key)) if k]
    keys += [m.lora_bias_key for m in op.lora_biases]
    return tuple(keys)


def _cut_keys(module: LoraModule) -> tuple[str, str]:
    """A fused-experts module's keys with the part of each an expert slice takes (ExpertSlice.cut)."""
    cut = module.expert
    rows = f"{cut.expert * cut.rank}:{(cut.expert + 1) * cut.rank}"
    a_cols = f", {cut.a_cols[0]}:{cut.a_cols[1]}" if cut.a_cols else ""
    b_rows = f"{cut.b_rows[0]}:{cut.b_rows[1]}" if cut.b_rows else ":"
    return f"{module.a_key}[{rows}{a_cols}]", f"{module.b_key}[{b_rows}, {cut.expert}::{cut.num_experts}]"


class _TiedHeads:
    """A causal LM whose lm_head is tied to its token embedding stores the two once, as the
    embedding. When the adapter changes one of them alone (modules_to_save, or LoRA on the head)
    and not with ensure_weight_tying, the PEFT model holds them apart: the changed one is PEFT's,
    the other keeps the base weight. OUT then gets the head as a tensor of its own (`untied`:
    head -> the embedding it is made from), beside the embedding, and config.json unties them.
    (A LoRA on the embedding alone changes the shared tensor, as PEFT's merge_and_unload does.)"""

    def __init__(self, base: Checkpoint, adapter: Adapter, mapper: BaseNameMapper):
        self.base, self.mapper = base, mapper
        self.saved = {e.key for e in adapter.extras if e.kind == "modules_to_save"}
        self.enabled = not adapter.config.raw.get("ensure_weight_tying") and mapper.causal_lm() is not False
        self.untied: dict[str, str] = {}

    def target(self, name: str, what: str, lm_head: bool | None = None) -> str:
        """The output tensor that `name` (from the adapter) changes: the base tensor mapper.find
        gives, or the head itself once untied from the embedding it is stored as."""
        found = self.mapper.find(name, what, lm_head=lm_head)
        if self.enabled and found not in self.mapper.candidates(name):
            self._untie(name, found, what)
            return name
        return found

    def source(self, name: str) -> str:
        """The base tensor an output tensor is made from."""
        return self.untied.get(name, name)

    def untie_saved_embedding(self, ops: dict[str, TensorOps]) -> None:
        """modules_to_save on a tied embedding: the PEFT model's head keeps the base weight."""
        embed, head = self.mapper.tied_pair()
        op = ops.get(embed) if embed else None
        if self.enabled and head not in self.untied and op is not None and op.replace_key in self.saved:
            self._untie(head, embed, f"modules_to_save tensor {op.replace_key}")

    def by_base_tensor(self, plan: MergePlan):
        """The plan with only base tensors' ops, then one plan per changed untied head with its
        ops on the embedding it starts from (what require_finite_merge can look up)."""
        yield replace(plan, ops={n: op for n, op in plan.ops.items() if n not in self.untied})
        for head, embed in self.untied.items():
            if head in plan.ops:
                yield replace(plan, ops={embed: plan.ops[head]})

    def _untie(self, head: str, embed: str, what: str) -> None:
        if self.mapper.causal_lm() is None:
            raise UnsupportedError(f"{what}: the base stores lm_head tied to {embed} and the adapter changes one of them "
                                   "alone; OUT needs its own lm_head and a config.json that unties them: give the base's "
                                   "model directory with its config.json", code="tied-head")
        if embed in self.base.quantized:
            raise UnsupportedError(f"{what}: lm_head is tied to {embed}, which is quantized; loratools does not untie it",
                                   code="tied-head")
        self.untied[head] = embed


def _check_keep_quantized(base: Checkpoint) -> None:
    if not base.quantized:
        raise UsageError("--keep-quantized: the base is not quantized")
    schemes = {w.scheme for w in base.quantized.values()}
    if schemes != {"fp8"}:
        # A LoRA ΔW is usually smaller than a 4-bit code's step: quantizing W+ΔW to 4 bits again
        # would round most of the adapter away. Block-scaled FP8 keeps it (3 mantissa bits per value).
        raise UnsupportedError(f"--keep-quantized supports FP8 block-scaled bases; this base is "
                               f"{base.describe_quantization()}, where re-quantizing would round most of ΔW away "
                               "(merge without it: a dequantized 16-bit model)", code="quantized-base")


def _drop_tied_copy(adapter: Adapter, name: str, op: TensorOps) -> None:
    """With ensure_weight_tying, PEFT gives a tied lm_head the embedding's own LoRA (and saves both).
    The PEFT model applies that ΔW once to the shared weight, but merge_and_unload adds it twice
    (once per module; PEFT issue #2777). loratools merges what the PEFT model computes: once."""
    embeds = [m for m in op.modules if m.role is Role.TOKEN_EMBED]
    heads = [m for m in op.modules if m.role is Role.LM_HEAD]
    if not (adapter.config.raw.get("ensure_weight_tying") and len(embeds) == 1 and len(heads) == 1):
        return
    import numpy as np

    embed, head = embeds[0], heads[0]
    (ea, eb), (ha, hb) = adapter.factor_arrays(embed.path), adapter.factor_arrays(head.path)
    if embed.scaling != head.scaling or not (np.array_equal(ha, eb.T) and np.array_equal(hb, ea.T)):
        raise UnsupportedError(f"base {name} is tied: {embed.path} and {head.path} carry different LoRA weights; "
                               "the PEFT model and PEFT's merge would disagree, loratools refuses to pick one")
    op.modules.remove(head)


def _require_finite(adapter: Adapter) -> None:
    """PEFT's safe_merge refuses NaN/Inf; so do we, before writing anything."""
    keys = [k for m in adapter.modules.values() for k in (m.a_key, m.b_key, m.magnitude_key, m.lora_bias_key, m.diag_key) if k]
    keys += [k for m in adapter.experts.values() for k in (m.a_key, m.b_key)]
    keys += [e.key for e in adapter.extras] + [t.key for t in adapter.trainable_tokens]
    for key in keys:
        if not adapter.tensors.finite(key):
            raise FormatError(f"{key} contains NaN or Inf (training diverged or the file is corrupt); refusing to merge it",
                              code="non-finite")


def _adapter_for(base: Checkpoint, adapter: Adapter) -> Adapter:
    adapter = adapter_for_base(base, adapter)
    if adapter.architecture is None and (adapter.config.fan_in_fan_out or adapter.detection.ambiguous_layout):
        raise UnsupportedError(
            f"cannot tell which modules are Conv1D ({adapter.detection.reason}); refusing to guess the orientation "
            "of ΔW: give a base directory with its config.json"
        )
    return adapter
