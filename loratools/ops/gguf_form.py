"""What a GGUF LoRA adapter can carry: `export` refuses the first thing it cannot, `validate
--target llama.cpp` reports each (a helper of both commands)."""

from __future__ import annotations

from ..adapter import Adapter
from ..arch import Layout
from ..arch import experts as moe


def gguf_blockers(adapter: Adapter) -> list[tuple[str | None, str]]:
    """(module path or None, reason) for everything a GGUF LoRA cannot carry: llama.cpp applies
    plain B·A only (export refuses the first; validate --target llama.cpp reports each)."""
    found: list[tuple[str | None, str]] = []
    # PEFT saves the base's embeddings beside LoRA on them (save_embedding_layers); llama.cpp takes
    # them from the model, as its own converter does. Anything else replaces base tensors.
    replacing = [e for e in adapter.extras if e.kind != "full_embedding"]
    if replacing or adapter.trainable_tokens:
        kinds = sorted({e.kind for e in replacing} | ({"trainable tokens"} if adapter.trainable_tokens else set()))
        found.append((None, f"the adapter replaces base tensors ({', '.join(kinds)}); a GGUF LoRA adapter cannot "
                            "carry them: merge it into the base instead (loratools merge)"))
    layout = experts_layout(adapter)
    if adapter.experts and layout is not None and layout.transposed:
        first = next(iter(adapter.experts))
        found.append((first, f"module {first}: LoRA on {layout.name}'s fused (E, in, out) experts, gate and up interleaved, "
                             "which loratools export does not write for llama.cpp; merge it into the base instead"))
    for path, module in adapter.modules.items():
        kind = ("DoRA" if module.magnitude_key else "lora_bias" if module.lora_bias_key else "KaSA" if module.diag_key
                else "a Conv1D module" if module.layout is Layout.CONV1D else None)
        if kind:
            found.append((path, f"module {path}: {kind} has no GGUF LoRA form (llama.cpp applies plain B·A); "
                                "merge it into the base instead"))
    return found


def experts_layout(adapter: Adapter) -> moe.ExpertsLayout | None:
    """The family's experts layout: from the base's model_type, else the model class PEFT recorded
    (GptOssForCausalLM is gpt_oss)."""
    if adapter.model_type:
        return moe.layout_for(adapter.model_type)
    recorded = (adapter.config.base_model_class or "").lower()
    return next((layout for layout in moe.LAYOUTS for t in layout.model_types
                 if recorded.startswith(t.lower().replace("_", "") + "for")), None)
