"""The in-memory LoRA adapter: its config, its modules (A, B, scaling, DoRA magnitude, biases)
and the extra tensors it carries, over a lazy tensor store.

Building an Adapter reads only key names, shapes and dtypes; tensors load when asked for. All
structural checks (pairs, ranks, shapes) happen here, so every later operation can trust them.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from .arch import Detection, Layout, Role, detect_from_paths, locate
from .arch import experts as moe
from .config import AdapterConfig, bdlora_blocks, variant_refusals
from .errors import ConfigError, FormatError, LoraToolsError, ShapeError, UnsupportedError
from .formats.dtypes import FLOAT_NAMES as FLOAT_DTYPES
from .formats.tensors import MemoryStore, TensorStore

if TYPE_CHECKING:
    import torch

# PEFT's spellings, the one table: every key is PREFIX + module path + "." + part.
PREFIX = "base_model.model."
FACTOR_PARTS = {False: ("lora_A.weight", "lora_B.weight"), True: ("lora_embedding_A", "lora_embedding_B")}  # by "embedding?"
MAGNITUDE_PART, LORA_BIAS_PART, DIAG_PART = "lora_magnitude_vector", "lora_B.bias", "lora_diag"  # DoRA, lora_bias, KaSA
BASE_PARTS = ("base_layer.bias", "base_layer.weight")  # trained base bias/weight saved beside the factors
MODULE_PARTS = (*FACTOR_PARTS[False], *FACTOR_PARTS[True], MAGNITUDE_PART, LORA_BIAS_PART, DIAG_PART, *BASE_PARTS)


def factor_keys(path: str, embedding: bool) -> tuple[str, str]:
    """The keys PEFT saves module `path`'s A and B under."""
    a, b = FACTOR_PARTS[embedding]
    return f"{PREFIX}{path}.{a}", f"{PREFIX}{path}.{b}"


# <module path>.<part>; the parts PEFT's LoRA writes for a targeted module.
_PART = re.compile(r"^(?P<module>.+)\.(?P<part>" + "|".join(map(re.escape, MODULE_PARTS)) + ")$")
# trainable_token_indices: the new rows of an embedding (PEFT's TrainableTokensWrapper).
_TOKENS = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta$")
# Tensors of a LoRA variant beyond its factors, which only PEFT's training step reads (VeLoRA's
# projection, MonteCLoRA's sampler): known to PEFT, so not "unknown"; merge leaves them out.
_VARIANT_PART = re.compile(r"^.+\.lora_(?:(?P<velora>velora)_embed|(?P<monteclora>monteclora)_sampler\.\w+)$")


@dataclass
class LoraModule:
    path: str  # relative to the model root, e.g. "model.layers.0.self_attn.q_proj"
    embedding: bool  # lora_embedding_A/B instead of lora_A/B
    rank: int
    alpha: float
    scaling: float
    a_key: str
    b_key: str
    in_features: int  # nn.Linear view: A is (r, in), B is (out, r); embedding: in = num_embeddings; ConvNd: in·Πkernel
    out_features: int  # embedding: out = embedding_dim
    layout: Layout
    role: Role | None = None
    layer: int | None = None
    magnitude_key: str | None = None  # DoRA
    lora_bias_key: str | None = None  # lora_bias=True: lora_B.bias
    base_bias_key: str | None = None  # bias="lora_only"/"all": replaces the base bias
    base_weight_key: str | None = None  # saved full embedding: replaces the base weight
    diag_key: str | None = None  # KaSA: ΔW = s·B·diag(d)·A
    expert: "ExpertSlice | None" = None  # one expert's part of a fused-experts module (merge's per-tensor view)
    kernel: tuple[int, ...] = ()  # nn.Conv1d/2d/3d: the kernel size (lora_A's trailing dims); () otherwise
    blocks: tuple[str, int] | None = None  # BD-LoRA: ("A" or "B", nblocks), that factor saved as its diagonal blocks

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this module changes, in the base's own orientation."""
        if self.kernel:  # nn.ConvNd (out, in, *kernel): ΔW's (out, in·Πkernel) matrix, reshaped
            return (self.out_features, self.in_features // math.prod(self.kernel), *self.kernel)
        if self.layout is Layout.LINEAR:
            return (self.out_features, self.in_features)
        return (self.in_features, self.out_features)  # Conv1D (in, out); Embedding (num, dim)

    @property
    def num_lora_params(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    @property
    def first_row(self) -> int:
        """The row of the base tensor's (rows, last dim) view where ΔW starts: 0 but for one expert
        of a tensor that stores all experts (its ΔW covers weight_shape[0] rows from there)."""
        return self.expert.first_row if self.expert else 0


@dataclass(frozen=True)
class ExpertSlice:
    """The part of a fused-experts module's factors one on-disk tensor takes: expert `expert`'s
    rank-r block (A's rows e·r…(e+1)·r, B's columns e, e+E, … — PEFT reshapes B to (out, r, E)),
    cut to `a_cols` of A or `b_rows` of B (a part such as gate out of gate_up)."""

    parameter: str  # the ExpertModule's path
    expert: int
    num_experts: int
    rank: int
    a_cols: tuple[int, int] | None = None
    b_rows: tuple[int, int] | None = None
    first_row: int = 0  # where its ΔW starts in the base tensor's (rows, last dim) view: e·d1 in a fused (E, d1, d2) tensor

    def cut(self, a, b_by_expert):
        """(A_e, B_e) of A as stored (r·E, in) and B arranged by expert (out, E, r) (by_expert),
        numpy arrays or torch tensors: views, each row of B_e contiguous."""
        e, r = self.expert, self.rank
        a, b = a[e * r: (e + 1) * r], b_by_expert[:, e]
        if self.a_cols:
            a = a[:, self.a_cols[0]: self.a_cols[1]]
        if self.b_rows:
            b = b[self.b_rows[0]: self.b_rows[1]]
        return a, b


def by_expert(b, num_experts: int):
    """A fused module's B (out, r·E) as (out, E, r): PEFT reshapes B to (out, r, E), so B_e is
    columns e, e+E, … — a gather that touches a cache line per element, E times over a module
    (measured: 17 ms a module of 64 experts); rearranged once, row by row, each B_e row is one run."""
    import numpy as np

    arranged = b.reshape(b.shape[0], -1, num_experts)
    if isinstance(arranged, np.ndarray):
        return np.ascontiguousarray(arranged.transpose(0, 2, 1))
    return arranged.transpose(1, 2).contiguous()


@dataclass
class ExpertModule:
    """LoRA on a fused 3-D experts parameter (E, d1, d2): PEFT's ParamWrapper (`target_parameters`),
    saved as A (r·E, in) and B (out, r·E) under the experts module's path (with one ".base_layer" per
    wrapper nested inside: PEFT wraps the module's parameters in registration order). Expert e's
    ΔW_e = s·B_e·A_e (ExpertSlice.cut), the (d1, d2) slice itself — or its transpose where the
    family stores (E, in, out) (arch/experts.py `transposed`)."""

    path: str  # the parameter in memory: "model.layers.0.mlp.experts.gate_up_proj"
    module: str  # the path its keys are saved under: "model.layers.0.mlp.experts.base_layer"
    num_experts: int
    rank: int  # per expert
    alpha: float
    scaling: float
    a_key: str
    b_key: str
    in_features: int  # A's width
    out_features: int  # B's height
    role: Role | None = None
    layer: int | None = None

    def expert_shape(self, transposed: bool) -> tuple[int, int]:
        """(d1, d2): one expert's slice of the parameter."""
        return (self.in_features, self.out_features) if transposed else (self.out_features, self.in_features)

    @property
    def num_lora_params(self) -> int:
        return self.rank * self.num_experts * (self.in_features + self.out_features)


@dataclass(frozen=True)
class Extra:
    """A tensor that replaces a base tensor outright when merged."""

    key: str  # key in the adapter file
    kind: str  # "modules_to_save" | "base_bias" | "full_embedding" | "bias" | "embedding_layer"
    target: str  # the base tensor it replaces, relative to the model root


@dataclass(frozen=True)
class TrainableTokens:
    """trainable_token_indices: rows of an embedding replaced by trained values (PEFT's index_copy)."""

    key: str  # ...token_adapter.trainable_tokens_delta, shape (len(indices), dim)
    path: str  # the embedding module
    indices: tuple[int, ...]

    @property
    def target(self) -> str:
        return f"{self.path}.weight"


class Adapter:
    def __init__(
        self,
        config: AdapterConfig,
        tensors: TensorStore,
        source: str | None = None,
        weights_path: str | None = None,
        collect_problems: bool = False,
        model_type: str | None = None,
    ):
        """collect_problems=False (the default): the first structural problem raises.
        True: problems are recorded in `self.problems` (with the module concerned) and the
        offending module is left out — how `validate` sees every problem at once."""
        self._collect = collect_problems
        self.model_type = model_type  # the base's family, when known: evidence module names are not
        self.problems: list[tuple[str | None, LoraToolsError]] = []
        self.config = config
        self.tensors = tensors
        self.source = source  # what the user named (a path or repo id), for messages and reports
        self.weights_path = weights_path  # the weights file it was read from, if any
        self.derived_from: tuple[Adapter, ...] = ()  # the adapters an in-memory one was computed from
        self.origin = "LORA"  # the peft_type read ("ADALORA": read as its equivalent LoRA, formats/adalora.py)
        self.pruned: list[str] = []  # AdaLoRA modules pruned to rank 0 (ΔW = 0, left out)
        self.modules: dict[str, LoraModule] = {}
        self.extras: list[Extra] = []
        self.trainable_tokens: list[TrainableTokens] = []
        self.unknown_keys: list[str] = []
        self.variant_keys: list[str] = []  # tensors of a LoRA variant beyond A and B (not merged)
        self.experts: dict[str, ExpertModule] = {}  # fused-experts LoRA (target_parameters), by parameter path
        self.expert_slices: dict[str, LoraModule] = {}  # their per-tensor views, made by merge's plan (expert_slice)
        # The last fused factors read: the E (or 2·E) slices of one fused module are merged one after
        # the other, each would otherwise read the whole fused A and B again (E² reads a layer).
        self._fused: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
        self.detection: Detection = Detection(None, reason="not detected")
        self._parse()

    @classmethod
    def from_tensors(
        cls, config: AdapterConfig | dict, tensors: Mapping[str, "torch.Tensor"], source: str | None = None
    ) -> "Adapter":
        """An adapter held in memory: a config (dict or parsed) and its tensors under PEFT keys."""
        if isinstance(config, dict):
            config = AdapterConfig.from_dict(config)
        return cls(config, MemoryStore(tensors), source=source)

    # ---- structure -------------------------------------------------------------------------

    def _parse(self) -> None:
        parts: dict[str, dict[str, str]] = {}
        plain: list[str] = []
        for key in self.tensors.keys():
            if not key.startswith(PREFIX):
                self.unknown_keys.append(key)
                continue
            rel = key[len(PREFIX) :]
            m = _PART.match(rel)
            if m:
                parts.setdefault(m["module"], {})[m["part"]] = key
            elif _TOKENS.match(rel):
                self._add_trainable_tokens(key, _TOKENS.match(rel)["module"])
            elif _variant_part(rel) in self.config.variants:
                self.variant_keys.append(key)
            else:
                plain.append(key)
        wrapped = self._wrapped_parameters([p for p, ps in parts.items() if _factor_parts(ps)])
        lora_paths = [p for p, ps in parts.items() if _factor_parts(ps) and p not in wrapped]
        extra_paths = [k[len(PREFIX) :].rsplit(".", 1)[0] for k in plain]
        self.detection = detect_from_paths(lora_paths, self.config.base_model_class, extra_paths, model_type=self.model_type)
        for path, ps in parts.items():
            if path in wrapped:
                self._build_expert(path, wrapped[path], ps)
            elif _factor_parts(ps):
                module = self._build_module(path, ps)
                if module is not None:
                    self.modules[path] = module
            for part, kind, suffix in (("base_layer.bias", "base_bias", "bias"), ("base_layer.weight", "full_embedding", "weight")):
                if part in ps:
                    self.extras.append(Extra(ps[part], kind, f"{path}.{suffix}"))
            if not _factor_parts(ps) and not set(ps) <= {"base_layer.bias", "base_layer.weight"}:
                stray = ", ".join(sorted(ps))
                self._problem(path, ShapeError(f"module {path}: has {stray} but no LoRA factors (lora_A/lora_B)", code="stray-tensor"))
        saved_modules = [p for p in extra_paths if any(p == n or p.endswith("." + n) for n in self.config.modules_to_save)]
        for key in plain:
            target = key[len(PREFIX) :]
            module = target.rsplit(".", 1)[0]
            if module in saved_modules:
                self.extras.append(Extra(key, "modules_to_save", target))
            elif self._tied_head_copy(module, saved_modules):
                # ensure_weight_tying with a saved embedding: PEFT also stores the tied head's copy
                self.extras.append(Extra(key, "modules_to_save", target))
            elif self._saved_embedding_layer(target):
                # save_embedding_layers (PEFT's default once the vocabulary was resized): the whole layer
                self.extras.append(Extra(key, "embedding_layer", target))
            elif target.endswith(".bias") and self.config.bias == "all":
                self.extras.append(Extra(key, "bias", target))
            else:
                self.unknown_keys.append(key)
        if self.config.lora_bias and self.modules and not any(m.lora_bias_key for m in self.modules.values()):
            self._problem(None, ConfigError(
                "adapter_config.json sets lora_bias but the weights have no lora_B.bias", code="lora-bias-mismatch"
            ))
        if self.config.trainable_token_indices is not None and not self.trainable_tokens:
            self._problem(None, ConfigError(
                "adapter_config.json sets trainable_token_indices but the weights have no trainable_tokens_delta",
                code="trainable-tokens-mismatch",
            ))
        if "kasa" in self.config.variants and self.modules and not all(m.diag_key for m in self.modules.values()):
            missing = next(p for p, m in self.modules.items() if not m.diag_key)
            self._problem(missing, ConfigError(f"module {missing}: kasa_config is set but it has no lora_diag", code="kasa-mismatch"))
        if self.config.use_dora and self.modules and not any(m.magnitude_key for m in self.modules.values()):
            self._problem(None, ConfigError(
                "adapter_config.json says use_dora but the weights have no lora_magnitude_vector", code="dora-mismatch"
            ))

    def _wrapped_parameters(self, paths: list[str]) -> dict[str, str]:
        """{saved module path: the parameter path} for PEFT ParamWrappers (target_parameters). PEFT
        wraps a module's targeted parameters in registration order, each wrapper around the last, so
        the first is saved deepest: `experts.base_layer.lora_A` (gate_up_proj), `experts.lora_A` (down_proj)."""
        listed = self.config.raw.get("target_parameters")
        targets = [t for t in listed if isinstance(t, str)] if isinstance(listed, list) else []
        if not targets:
            return {}
        order = moe.parameter_order(self.model_type)
        found = {}
        for path in paths:
            module, depth = path, 0
            while module.endswith(".base_layer"):
                module, depth = module[: -len(".base_layer")], depth + 1
            # PEFT matches a target against `<module>.<parameter>` for the parameters the module
            # holds; without the model, an experts module holds the fused parameters and any other
            # module its weight (so "all-linear"'s bare `down_proj` is never an attention module's).
            holds = None if module.rpartition(".")[2] == "experts" else {"weight"}
            names = {leaf for t in targets for leaf in [t.rpartition(".")[2]]
                     if (holds is None or leaf in holds)
                     and (f"{module}.{leaf}" == t or f"{module}.{leaf}".endswith("." + t))}
            ordered = [n for n in order if n in names] + sorted(names - set(order))
            if depth < len(ordered) and not (ordered == ["weight"] and depth == 0):
                # (a module's own 2-D weight alone, e.g. a v5 router, is an nn.Linear LoRA: a plain module)
                found[path] = f"{module}.{ordered[len(ordered) - 1 - depth]}"
        return found

    def _build_expert(self, path: str, parameter: str, ps: dict[str, str]) -> None:
        a_part, b_part = FACTOR_PARTS[False]
        if a_part not in ps or b_part not in ps:
            have, missing = (a_part, b_part) if a_part in ps else (b_part, a_part)
            return self._problem(path, ShapeError(f"module {path}: {have} has no matching {missing}", code="orphan-factor"))
        a, b = self.tensors.meta(ps[a_part]), self.tensors.meta(ps[b_part])
        if any(m.dtype not in FLOAT_DTYPES or len(m.shape) != 2 or 0 in m.shape for m in (a, b)):
            return self._problem(path, ShapeError(
                f"module {path} ({parameter}): lora_A {a.dtype}{list(a.shape)} and lora_B {b.dtype}{list(b.shape)} "
                "must be 2-D floating point", code="unsharded-factor"))
        rank = self.config.rank_for(parameter)
        if a.shape[0] != b.shape[1] or a.shape[0] % rank:
            return self._problem(path, ShapeError(
                f"module {path} ({parameter}): lora_A {list(a.shape)} and lora_B {list(b.shape)} are not r·E = "
                f"{rank}·E for the fused experts (r={rank} from the config)", code="expert-rank"))
        if a.shape[0] == rank:
            return self._problem(path, UnsupportedError(
                f"module {path}: target_parameters on {parameter} with one expert (a 2-D parameter); "
                "loratools merges fused 3-D expert parameters only", code="fused-experts"))
        found = re.search(r"\.(\d+)\.", parameter)
        leaf = parameter.rpartition(".")[2]
        roles = {p.name: p.role for layout in moe.LAYOUTS for p in layout.parameters}
        self.experts[parameter] = ExpertModule(
            path=parameter, module=path, num_experts=a.shape[0] // rank, rank=rank,
            alpha=self.config.alpha_for(parameter), scaling=self.config.scaling_for(parameter),
            a_key=ps[a_part], b_key=ps[b_part], in_features=a.shape[1], out_features=b.shape[0],
            role=roles.get(leaf), layer=int(found[1]) if found else None,
        )
        stray = sorted(set(ps) - {a_part, b_part})
        if stray:
            self._problem(path, ShapeError(f"module {path}: fused-experts LoRA with {', '.join(stray)} "
                                           "(PEFT's ParamWrapper saves only lora_A/lora_B)", code="stray-tensor"))

    def expert_slice(self, expert: ExpertModule, index: int, rows: tuple[int, int], transposed: bool,
                     stacked: bool = False) -> LoraModule:
        """The plain LoRA module that expert `index`'s rows `rows` of its (d1, d2) slice are: its
        factors are views of the fused ones (factors() cuts them), registered under a path of its own.
        stacked: the base tensor holds every expert, (E, d1, d2); this one's rows start at index·d1."""
        d1, d2 = expert.expert_shape(transposed)
        full = rows == (0, d1)
        cut = ExpertSlice(expert.path, index, expert.num_experts, expert.rank,
                          a_cols=None if full or not transposed else rows, b_rows=None if full or transposed else rows,
                          first_row=index * d1 + rows[0] if stacked else 0)
        height = rows[1] - rows[0]
        path = f"{expert.path}[{index}]" + ("" if full else f"[{rows[0]}:{rows[1]}]")
        module = LoraModule(
            path=path, embedding=False, rank=expert.rank, alpha=expert.alpha, scaling=expert.scaling,
            a_key=expert.a_key, b_key=expert.b_key,
            # (d1, d2) = s·B_e·A_e, an nn.Linear's (out, in); transposed: s·(B_e·A_e)ᵀ, stored as Conv1D stores (in, out)
            in_features=height if transposed else d2, out_features=d2 if transposed else height,
            layout=Layout.CONV1D if transposed else Layout.LINEAR, role=expert.role, layer=expert.layer, expert=cut,
        )
        self.expert_slices[path] = module
        return module

    def _role(self, path: str) -> Role | None:
        det = self.detection
        ref = locate(det.architecture, det.prefix, path) if det.known and det.prefix is not None else None
        return ref.role if ref else None

    def _tied_head_copy(self, path: str, saved_modules: list[str]) -> bool:
        """`path` is the lm_head PEFT ties (ensure_weight_tying) to a token embedding in modules_to_save."""
        return (bool(self.config.raw.get("ensure_weight_tying")) and self._role(path) is Role.LM_HEAD
                and any(self._role(m) is Role.TOKEN_EMBED for m in saved_modules))

    def _saved_embedding_layer(self, target: str) -> bool:
        """`target` is a token embedding's or lm_head's weight, saved whole by save_embedding_layers."""
        return target.endswith(".weight") and self._role(target[: -len(".weight")]) in (Role.TOKEN_EMBED, Role.LM_HEAD)

    def _problem(self, module: str | None, error: LoraToolsError) -> None:
        if not self._collect:
            raise error
        self.problems.append((module, error))

    def _build_module(self, path: str, ps: dict[str, str]) -> LoraModule | None:
        """The module, or None after reporting why it cannot be one (collect mode)."""
        embedding = any(p in ps for p in FACTOR_PARTS[True])
        a_part, b_part = FACTOR_PARTS[embedding]
        if embedding and any(p in ps for p in FACTOR_PARTS[False]):
            return self._problem(path, ShapeError(f"module {path}: has both lora_A/lora_B and lora_embedding_A/B", code="mixed-factors"))
        for have, missing in ((a_part, b_part), (b_part, a_part)):
            if have in ps and missing not in ps:
                return self._problem(path, ShapeError(f"module {path}: {have} has no matching {missing}", code="orphan-factor"))
        a, b = self.tensors.meta(ps[a_part]), self.tensors.meta(ps[b_part])
        for part, meta in ((a_part, a), (b_part, b)):
            if meta.dtype not in FLOAT_DTYPES:
                return self._problem(path, FormatError(
                    f"module {path}: {part} has dtype {meta.dtype}; LoRA factors must be floating point", code="non-float-factor"
                ))
        kernel = _conv_kernel(a.shape, b.shape) if not embedding else None
        if kernel is not None:  # nn.Conv1d/2d/3d LoRA: lora_A a kxk convolution to r channels, lora_B 1x1
            problem = _conv_problem(path, a.shape, b.shape)
            if problem is not None:
                return self._problem(path, problem)
        for part, meta in ((a_part, a), (b_part, b)) if kernel is None else ():
            if len(meta.shape) != 2 or 0 in meta.shape:
                return self._problem(path, ShapeError(
                    f"module {path}: {part} has shape {list(meta.shape)}, expected 2-D; a 1-D or empty factor "
                    "means ZeRO-3/FSDP shards were saved without being gathered",
                    code="unsharded-factor",
                ))
        try:
            blocks = None if embedding or kernel else bdlora_blocks(self.config.raw, path)
        except LoraToolsError as exc:
            return self._problem(path, exc)
        a_shape, b_shape = _expanded_shapes(a.shape, b.shape, blocks)
        if blocks is not None and a_shape is None:
            side, n = blocks
            saved = list((a if side == "A" else b).shape)
            return self._problem(path, ShapeError(
                f"module {path}: BD-LoRA's block-diagonal lora_{side} {saved} is not {n} blocks of equal rows "
                f"(nblocks={n} must divide its {saved[0]} rows)", code="bdlora-blocks"))
        if a_shape[0] != b_shape[1]:
            return self._problem(path, ShapeError(
                f"module {path}: {a_part} {list(a.shape)} and {b_part} {list(b.shape)} disagree on the rank", code="factor-rank"
            ))
        rank = self.config.rank_for(path)
        if a_shape[0] != rank:
            source = "rank_pattern" if rank != self.config.r else "r"
            return self._problem(path, ShapeError(
                f"module {path}: tensors have rank {a.shape[0]} but the config gives r={rank} (from {source})", code="rank-mismatch"
            ))
        alpha = self.config.alpha_for(path)
        ref = locate(self.detection.architecture, self.detection.prefix, path) if self.detection.known else None
        if embedding:
            layout = Layout.EMBEDDING
        elif kernel:  # an nn.ConvNd weight is (out, in, *kernel): ΔW in LoRA's own orientation
            layout = Layout.LINEAR
        elif ref is not None:
            layout = ref.layout
        else:
            layout = Layout.LINEAR
        module = LoraModule(
            path=path,
            embedding=embedding,
            rank=rank,
            alpha=alpha,
            scaling=self.config.scaling_for(path),
            a_key=ps[a_part],
            b_key=ps[b_part],
            in_features=math.prod(a_shape[1:]),  # ConvNd: the columns of A's (r, in·Πkernel) matrix view
            out_features=b_shape[0],
            layout=layout,
            role=ref.role if ref else None,
            layer=ref.layer if ref else None,
            magnitude_key=ps.get(MAGNITUDE_PART),
            diag_key=ps.get("lora_diag"),
            lora_bias_key=ps.get("lora_B.bias"),
            base_bias_key=ps.get("base_layer.bias"),
            base_weight_key=ps.get("base_layer.weight"),
            kernel=kernel or (),
            blocks=blocks,
        )
        out = module.out_features
        for key, what, want in (
            # DoRA on a ConvNd saves its magnitude as (1, out, 1, …): PEFT's weight norm, kept as computed
            (module.magnitude_key, "lora_magnitude_vector", (1, out, *(1 for _ in kernel)) if kernel else (out,)),
            (module.lora_bias_key, "lora_B.bias", (out,)),
            (module.diag_key, "lora_diag", (module.rank,)),
        ):
            if key is not None and self.tensors.meta(key).shape != want:
                shape = list(self.tensors.meta(key).shape)
                return self._problem(path, ShapeError(f"module {path}: {what} has shape {shape}, expected {list(want)}", code="vector-shape"))
            if key is not None and self.tensors.meta(key).dtype not in FLOAT_DTYPES:
                return self._problem(path, FormatError(
                    f"module {path}: {what} has dtype {self.tensors.meta(key).dtype}; expected floating point", code="non-float-factor"
                ))
        if module.diag_key and "kasa" not in self.config.variants:
            return self._problem(path, ConfigError(
                f"module {path}: has a KaSA lora_diag but the config has no kasa_config (PEFT would ignore it)", code="kasa-mismatch"
            ))
        if module.lora_bias_key and not self.config.lora_bias:
            return self._problem(path, ConfigError(
                f"module {path}: has lora_B.bias but the config does not set lora_bias (PEFT would ignore it)",
                code="lora-bias-mismatch",
            ))
        if module.magnitude_key and not self.config.use_dora:
            return self._problem(path, ConfigError(
                f"module {path}: has a DoRA lora_magnitude_vector but the config does not set use_dora", code="dora-mismatch"
            ))
        return module

    def _add_trainable_tokens(self, key: str, path: str) -> None:
        indices = self.config.token_indices_for(path)
        meta = self.tensors.meta(key)
        if indices is None:
            return self._problem(path, ConfigError(
                f"module {path}: has trainable_tokens_delta but trainable_token_indices names no such module",
                code="trainable-tokens-mismatch",
            ))
        if meta.dtype not in FLOAT_DTYPES or len(meta.shape) != 2 or meta.shape[0] != len(indices):
            return self._problem(path, ShapeError(
                f"module {path}: trainable_tokens_delta is {meta.dtype}{list(meta.shape)}, expected a float "
                f"[{len(indices)}, dim] for the {len(indices)} trainable_token_indices",
                code="trainable-tokens-shape",
            ))
        if len(set(indices)) != len(indices):
            return self._problem(path, ConfigError(f"module {path}: trainable_token_indices repeats a token id", code="trainable-tokens-mismatch"))
        self.trainable_tokens.append(TrainableTokens(key, path, tuple(indices)))

    def require_supported(self, operation: str, merging: bool = False, analysis: bool = False, experts: bool = False,
                          conv: bool = False) -> None:
        """Refuse, naming the first reason, an adapter this operation cannot reproduce exactly:
        a tensor it cannot place, or a PEFT feature whose effect is not (only) s·B·A.
        analysis=True (svd): only what would make the spectra of s·B·A wrong.
        experts=True: the operation handles fused-experts modules (`self.experts`); others refuse them.
        conv=True: the operation handles ConvNd modules (merge); the others write 2-D factors only."""
        if analysis:
            reasons = variant_refusals(self.config.raw, merging=False, analysis=True)
            if reasons:
                raise UnsupportedError(f"cannot {operation} {self.source or 'the adapter'}: {reasons[0]}", code="unsupported")
            return
        reasons = self.config.refusals(merging)
        if self.experts and not experts:
            first = next(iter(self.experts))
            raise UnsupportedError(
                f"cannot {operation} {self.source or 'the adapter'}: it has LoRA on fused MoE expert parameters "
                f"(target_parameters: {len(self.experts)}, e.g. {first}); loratools {operation} does not support them "
                "(merge, info, validate, svd, resize, combine and convert --to-lora do)", code="fused-experts")
        if not conv and (refusal := self.conv_refusal(operation)):
            reasons.append(refusal)
        if self.unknown_keys:
            more = f" (and {len(self.unknown_keys) - 1} more)" if len(self.unknown_keys) > 1 else ""
            reasons.append(f"tensor {self.unknown_keys[0]!r}{more} is not part of a LoRA adapter loratools knows; "
                           "refusing rather than ignoring it (loratools validate lists them)")
        if not merging and self.trainable_tokens:
            reasons.append("trainable_token_indices (trainable_tokens_delta) cannot be carried over; loratools merge supports them")
        if reasons:
            raise UnsupportedError(f"cannot {operation} {self.source or 'the adapter'}: {reasons[0]}", code="unsupported")

    def conv_refusal(self, operation: str) -> str | None:
        """Why `operation`, which writes an adapter's 2-D factors, refuses this adapter's ConvNd
        modules (None: it has none)."""
        convs = [p for p, m in self.modules.items() if m.kernel]
        if not convs:
            return None
        more = f" (and {len(convs) - 1} more)" if len(convs) > 1 else ""
        shape = list(self.tensors.meta(self.modules[convs[0]].a_key).shape)
        return (f"module {convs[0]}{more} is a convolution's LoRA (lora_A {shape}), which {operation} cannot write: "
                "it writes the 2-D factors of Linear, Conv1D and Embedding modules only (merge and svd take it)")

    # ---- tensors ---------------------------------------------------------------------------

    def for_model_type(self, model_type: str) -> "Adapter":
        """The same adapter re-read knowing its base's model_type (which decides, for example,
        whether GPT-2-named modules are Conv1D as in GPT-2 or nn.Linear as in StarCoder)."""
        matched = Adapter(self.config, self.tensors, source=self.source, weights_path=self.weights_path,
                          collect_problems=self._collect, model_type=model_type)
        matched.derived_from = self.derived_from  # still made from the same inputs: outputs must not overwrite them
        return matched

    def input_paths(self) -> list[str]:
        """The directory this adapter was read from, and those of the adapters an in-memory one
        was derived from (`derived_from`): what outputs must not overwrite."""
        own = [os.path.dirname(os.path.abspath(self.weights_path))] if self.weights_path else []
        return own + [p for source in self.derived_from for p in source.input_paths()]

    def tensor(self, key: str) -> "torch.Tensor":
        return self.tensors.get(key)

    def module(self, path: str) -> LoraModule:
        """A module of the adapter, or a per-tensor view of a fused-experts one (expert_slice)."""
        return self.modules[path] if path in self.modules else self.expert_slices[path]

    def factors(self, path: str) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(A, B) as matrices: A (r, in), B (out, r) — embeddings: A (r, num), B (dim, r); a ConvNd's
        A (r, in·Πkernel) and B (out, r), its stored kernels' matrix views (ΔW = s·B@A is then the
        (out, in·Πkernel) view of the 3-5-D weight, as PEFT's B⊛A); an expert slice's cut out of the
        fused factors."""
        module = self.module(path)
        if module.expert:
            return module.expert.cut(*self.fused_factors(module, "tensor"))
        return _matrices(module, self.tensors.get(module.a_key), self.tensors.get(module.b_key))

    def factor_arrays(self, path: str):
        """factors() as numpy arrays, read without importing torch (bf16 widened to float32)."""
        module = self.module(path)
        if module.expert:
            return module.expert.cut(*self.fused_factors(module, "array"))
        return _matrices(module, self.tensors.array(module.a_key), self.tensors.array(module.b_key))

    def fused_factors(self, module: LoraModule, kind: str = "array"):
        """An expert slice's whole fused factors, read once for all the module's slices: A (r·E, in)
        as stored, B arranged by expert (out, E, r) (by_expert); numpy arrays ("array") or torch
        tensors ("tensor")."""
        key = (kind, module.a_key, module.b_key)
        if key not in self._fused:
            read = self.tensors.array if kind == "array" else self.tensors.get
            self._fused[key] = read(module.a_key), by_expert(read(module.b_key), module.expert.num_experts)
            while len(self._fused) > 2:  # two fused modules (gate_up and down of a layer, or numpy and torch kernels)
                self._fused.popitem(last=False)
        return self._fused[key]

    def delta(self, path: str, device: "torch.device | str | None" = None) -> "torch.Tensor":
        """ΔW = s·B@A in float32, in the base weight's own orientation and shape (transposed for
        Conv1D and embeddings; a ConvNd's (out, in, *kernel))."""
        import torch

        module = self.module(path)
        a, b = (t.to(device=device, dtype=torch.float32) for t in self.factors(path))
        if module.diag_key:  # KaSA
            b = b * self.tensors.get(module.diag_key).to(device=device, dtype=torch.float32)
        delta = (b @ a).mul_(module.scaling)
        return module.layout.lora_view(delta).reshape(module.weight_shape)

    def state_dict(self) -> dict[str, "torch.Tensor"]:
        """Every tensor of the adapter, loaded, under its PEFT key."""
        return {key: self.tensors.get(key) for key in self.tensors.keys()}

    @property
    def architecture(self) -> str | None:
        return self.detection.architecture


def _variant_part(rel: str) -> str | None:
    """The variant whose own tensor this key is (`velora`, `monteclora`), or None."""
    m = _VARIANT_PART.match(rel)
    return (m["velora"] or m["monteclora"]) if m else None


def _factor_parts(ps: dict[str, str]) -> bool:
    return any(p in ps for p in (*FACTOR_PARTS[False], *FACTOR_PARTS[True]))


def _matrices(module: LoraModule, a, b):
    """A and B (torch tensors or numpy arrays) as matrices: a ConvNd's kernels flattened, BD-LoRA's
    block-diagonal factor expanded from its saved blocks."""
    if module.kernel:
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if module.blocks is not None:
        side, n = module.blocks
        return (_block_diagonal(a, n), b) if side == "A" else (a, _block_diagonal(b, n))
    return a, b


def _block_diagonal(saved, n: int):
    """PEFT's BlockDiagonalLinear.weight_as_blockdiagonal_matrix: the saved (rows, cols) weight's
    n chunks of rows/n rows, placed on the diagonal of a (rows, n·cols) matrix of zeros."""
    import numpy as np

    rows, cols = saved.shape
    step = rows // n
    if isinstance(saved, np.ndarray):
        full = np.zeros((rows, n * cols), dtype=saved.dtype)
    else:
        full = saved.new_zeros((rows, n * cols))
    for i in range(n):
        full[i * step:(i + 1) * step, i * cols:(i + 1) * cols] = saved[i * step:(i + 1) * step]
    return full


def _expanded_shapes(a_shape, b_shape, blocks: tuple[str, int] | None):
    """The shapes of A and B once BD-LoRA's block-diagonal factor is expanded ((None, None) when
    its rows are not nblocks equal chunks)."""
    if blocks is None:
        return tuple(a_shape), tuple(b_shape)
    side, n = blocks
    rows, cols = a_shape if side == "A" else b_shape
    if rows % n:
        return None, None
    full = (rows, cols * n)
    return (full, tuple(b_shape)) if side == "A" else (tuple(a_shape), full)


def _conv_kernel(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The kernel size of a ConvNd LoRA (PEFT's _ConvNd: lora_A (r, in, *kernel), lora_B (out, r, 1, …)),
    or None for 2-D factors. 3-, 4- and 5-D factors are nn.Conv1d, Conv2d and Conv3d."""
    return tuple(a_shape[2:]) if 3 <= max(len(a_shape), len(b_shape)) <= 5 else None


def _conv_problem(path: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> LoraToolsError | None:
    """Why these are not the factors of a ConvNd LoRA that merges as PEFT merges it, or None.

    PEFT's ΔW = s·B⊛A (lora_B's 1x1 kernel contracted with lora_A's r output channels at every
    kernel position) is, on the weight's (out, in·Πkernel) matrix view, s·B·A of the factors'
    matrix views: the merge of a Linear."""
    shapes = f"lora_A {list(a_shape)}, lora_B {list(b_shape)}"
    if len(a_shape) != len(b_shape) or 0 in a_shape or 0 in b_shape or any(k != 1 for k in b_shape[2:]):
        return ShapeError(f"module {path}: {shapes} are not the factors of a convolution's LoRA (PEFT's lora_A "
                          "(r, in, *kernel) and lora_B (out, r, 1, …), of one dimension count)", code="conv-factor")
    rank, b_rank = a_shape[0], b_shape[1]
    if b_rank != rank and rank % b_rank == 0:
        return UnsupportedError(
            f"module {path}: {shapes}: a LoRA on a grouped convolution (groups={rank // b_rank}); its lora_A reaches "
            "every input channel while the base weight connects each output only to its own group, so no weight of "
            "the base's shape computes it, and PEFT's merge_and_unload refuses it too (groups > 1)", code="conv-groups")
    return None
