"""The first phase of a merge: map an adapter onto a base checkpoint and make every check that
can be made before writing (headers, and the adapter's own values, which are small). No torch:
`validate --base` runs the same plan, so an adapter it passes is one merge takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..adapter import Adapter, LoraModule, TrainableTokens
from ..arch import Layout, Role
from ..errors import FormatError, ShapeError, UnsupportedError, UsageError
from ..formats.checkpoint import Checkpoint
from ..formats.safetensors_header import FLOAT_DTYPES
from .basemap import BaseNameMapper, adapter_for_base, unmergeable_dtype
from .initial import check_on_base
from .merge_bounds import require_finite_merge
from .merge_vocab import AddedTokens

DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


@dataclass
class TensorOps:
    """What happens to one base tensor: an optional replacement, then additive updates."""

    replace_key: str | None = None  # adapter key whose tensor replaces the base tensor
    rows: list[TrainableTokens] = field(default_factory=list)  # rows replaced (trainable_token_indices)
    modules: list[LoraModule] = field(default_factory=list)  # add s·ΔW (DoRA: renormalise)
    lora_biases: list[LoraModule] = field(default_factory=list)  # add s·lora_B.bias


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of OUT, as the plan decides it: the executor writes exactly these."""

    name: str
    dtype: str  # dtype code it is written in
    shape: tuple[int, ...]
    source: str  # the base tensor it is made from: itself, or the embedding an untied head was tied to


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
    vocab_resized: tuple[int, int] | None = None  # (base rows, the adapter's) of a resized vocabulary (merge_vocab.py)


def plan_merge(base: Checkpoint, adapter: Adapter, scale: float = 1.0, dtype: str | None = None,
               keep_quantized: bool = False) -> MergePlan:
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
    adapter.require_supported("merge", merging=True)
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
    if not adapter.modules and not adapter.extras and not adapter.trainable_tokens:
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
        if module.diag_key and (module.layout is not Layout.LINEAR or module.rank >= min(info.shape)):
            raise UnsupportedError(f"module {module.path}: KaSA needs an nn.Linear with r < min(in, out) (PEFT's own condition)")
        ops.setdefault(name, TensorOps()).modules.append(module)
        if module.lora_bias_key:
            bias = mapper.find(f"{module.path}.bias", f"lora_bias of {module.path}", required=False)
            if bias is None:
                raise ShapeError(f"module {module.path}: lora_bias=True but the base layer has no bias (PEFT cannot merge it either)")
            ops.setdefault(bias, TensorOps()).lora_biases.append(module)
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
                     _outputs(base, out_dtype, keep_quantized, heads.untied))
    added.finish(plan, heads.untied)
    for checked in heads.by_base_tensor(plan):  # the bound check finds each changed tensor in the base by name
        require_finite_merge(checked)
    return plan


def _extra_target(heads: "_TiedHeads", mapper: BaseNameMapper, extra) -> str:
    """The output tensor an extra replaces. A layer saved by save_embedding_layers is loaded by
    PEFT into the model's own parameter: a tied head's copy into the shared tensor (no untying)."""
    if extra.kind == "embedding_layer":
        return mapper.find(extra.target, f"saved embedding layer {extra.key}")
    return heads.target(extra.target, f"{extra.kind} tensor {extra.key}")


def _outputs(base: Checkpoint, out_dtype: str | None, keep_quantized: bool, untied: dict[str, str]) -> dict[str, list[OutputTensor]]:
    """Every tensor of OUT, shard by shard in file order, with the dtype it is written in.
    --dtype casts the model's float tensors. With keep_quantized a quantized weight keeps its
    stored format (FP8 codes; a changed one quantized again) and so do its float32 scales,
    which are not the model's floats; otherwise it is written dequantized and its scales and code
    maps are dropped. An untied head follows the embedding it is made from."""
    head_of = {embed: head for head, embed in untied.items()}
    outputs = {}
    for shard, header in base.shards.items():
        entries = []
        for name in sorted(header.tensors, key=lambda n: header.tensors[n].start):  # sequential reads
            stored = header.tensors[name]
            if keep_quantized and (name in base.quantized or name in base.quant_parts):
                dtype = stored.dtype
            elif name in base.quant_parts:
                continue
            else:
                stored = base.info(name)  # a quantized weight: its dequantized dtype and shape
                dtype = out_dtype if out_dtype and stored.dtype in FLOAT_DTYPES else stored.dtype
            entries.append(OutputTensor(name, dtype, tuple(stored.shape), name))
            if name in head_of:
                entries.append(OutputTensor(head_of[name], dtype, tuple(stored.shape), name))
        outputs[shard] = entries
    return outputs


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
