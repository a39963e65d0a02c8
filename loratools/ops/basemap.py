"""Where an adapter's module lands in a base checkpoint (shared by merge and validate; no torch)."""

from __future__ import annotations

from ..adapter import Adapter
from ..arch import ARCHITECTURES, Role, detect_from_config, locate
from ..arch.renames import alternatives, is_multimodal, shares_text_decoder
from ..errors import ConfigError, ShapeError
from ..formats.checkpoint import Checkpoint
from ..formats.safetensors_header import TensorInfo


GENERATING_HEADS = ("causal-lm", "image-text-to-text")  # Head.name of the heads whose lm_head PEFT unties


def base_architecture(base: Checkpoint) -> str | None:
    """The base's family from its config.json, or None (no config, or an unknown model_type)."""
    return detect_from_config(base.config).architecture if base.config else None


def adapter_for_base(base: Checkpoint, adapter: Adapter) -> Adapter:
    """The adapter as it applies to this base: re-read with the base's model_type (config.json),
    which is what decides the family when module names alone cannot. Raises when adapter and base
    are of different families (or the names do not fit the base's family)."""
    base_arch = base_architecture(base)
    if base_arch is None:
        return adapter
    det = adapter.detection
    text_decoder = det.known and (is_multimodal(base_arch) or is_multimodal(det.architecture)) and (
        shares_text_decoder(det.architecture, base_arch, base.config)
        or (not det.family_known and det.scheme == ARCHITECTURES[base_arch].scheme))
    if det.known and (det.family_known or det.scheme != ARCHITECTURES[base_arch].scheme) and det.architecture != base_arch \
            and not text_decoder:
        raise ConfigError(f"the adapter is for {det.architecture} but the base is {base_arch} (config.json)", code="base-architecture")
    matched = adapter.for_model_type(base_arch)
    if matched.detection.known and matched.architecture != base_arch:
        if text_decoder:
            # A text decoder's adapter on its multimodal model, or the reverse: the same text
            # tensors under other names (arch/renames.py); the adapter keeps its own reading.
            return adapter
        raise ConfigError(f"the adapter's module names are {matched.architecture}'s, but the base is {base_arch} (config.json)",
                          code="base-architecture")
    return matched


def unmergeable_dtype(info: TensorInfo) -> str | None:
    """Why a base weight of this dtype cannot take a ΔW (quantized or packed), or None."""
    if info.dtype in ("F64", "F32", "F16", "BF16"):
        return None
    kind = "FP8" if info.dtype.startswith("F8") else "integer/packed (a quantized checkpoint?)"
    return f"{info.dtype}, {kind}; only float16/bfloat16/float32/float64 bases can be merged"


class BaseNameMapper:
    """Find the base tensor for a name from the adapter. Checkpoints are saved with or without
    the backbone prefix (GPT-2's Hub checkpoint has `h.0...`, GPT2LMHeadModel's modules are
    `transformer.h.0...`), so the prefix is added or dropped when that is what matches; a module
    the family's checkpoints store under another name (GPT-NeoX's lm_head as embed_out) is
    found under either."""

    def __init__(self, base: Checkpoint, adapter: Adapter):
        self.base = base
        arch = adapter.architecture or base_architecture(base)
        archs = [ARCHITECTURES[arch]] if arch else list(ARCHITECTURES.values())
        self.arch = ARCHITECTURES.get(arch) if arch else None
        self.adapter_prefix = adapter.detection.prefix if adapter.detection.known else None
        self.prefixes = sorted({h.prefix for a in archs for h in a.heads if h.prefix}, key=len, reverse=True)
        # transformers' key renames (a multimodal model's two layouts) of the adapter's family and
        # of the base's model_type (also one loratools has no module table for)
        model_type = (base.config or {}).get("model_type")
        self.model_types = (adapter.architecture, base_architecture(base), model_type if isinstance(model_type, str) else None)

    def candidates(self, name: str) -> list[str]:
        out = alternatives(self.model_types, name)
        for prefix in self.prefixes:
            out.append(name[len(prefix):] if name.startswith(prefix) else prefix + name)
        for module, saved in self.arch.checkpoint_names if self.arch is not None else ():
            for have, other in ((module, saved), (saved, module)):
                if name.startswith(have + "."):
                    out.append(other + name[len(have):])  # the family's other name for that module
        return out

    def is_lm_head(self, name: str) -> bool:
        if self.arch is None or self.adapter_prefix is None:
            return False
        ref = locate(self.arch, self.adapter_prefix, name.rsplit(".", 1)[0])
        return ref is not None and ref.role is Role.LM_HEAD

    def find(self, name: str, what: str, required: bool = True, lm_head: bool | None = None) -> str | None:
        for candidate in self.candidates(name):
            if candidate in self.base:
                return candidate
        if lm_head is None:
            lm_head = self.is_lm_head(name) and name.endswith(".weight")
        if lm_head and self.arch is not None and self.tied():
            # A tied lm_head is stored once, as the token embedding it shares.
            embed = self._embedding()
            if embed is not None:
                return embed
        if required:
            raise ShapeError(f"{what}: no tensor {name} in the base checkpoint (wrong base model?)", code="base-missing-module")
        return None

    def tied(self) -> bool:
        return bool((self.base.config or {}).get("tie_word_embeddings", True))

    def tied_pair(self) -> tuple[str | None, str | None]:
        """(the token embedding, the lm_head weight's name) when the base stores its lm_head only
        as that embedding (tied); else (None, None)."""
        heads = [t.path for t in self.arch.modules if t.role is Role.LM_HEAD] if self.arch is not None else []
        if not heads or not self.tied():
            return None, None
        head = ("lm_head" if "lm_head" in heads else heads[0]) + ".weight"  # transformers 5 names them all lm_head
        if any(c in self.base for c in self.candidates(head)):
            return None, None
        embed = self._embedding()
        return (embed, head) if embed is not None else (None, None)

    def causal_lm(self) -> bool | None:
        """Whether the base generates text through its lm_head (a causal LM, or a multimodal
        model's text decoder), from config.json (the head class it records, else its family's);
        None without a config.json."""
        if not self.base.config:
            return None
        detection = detect_from_config(self.base.config)
        arch = ARCHITECTURES.get(detection.architecture) if detection.architecture else self.arch
        if detection.head is not None:
            return detection.head in GENERATING_HEADS
        return arch is not None and any(h.name in GENERATING_HEADS for h in arch.heads)

    def _embedding(self) -> str | None:
        embed = self.arch.template(Role.TOKEN_EMBED)
        for prefix in ("", *self.prefixes) if embed is not None else ():
            if f"{prefix}{embed.path}.weight" in self.base:
                return f"{prefix}{embed.path}.weight"
        return None
