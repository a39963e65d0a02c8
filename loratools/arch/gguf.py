"""What llama.cpp calls each family we export to GGUF, and whether its converter reorders the
rows of q/k projections (llama.cpp applies rotary embeddings to interleaved halves, so
convert_hf_to_gguf.py permutes q_proj/k_proj rows for the LLaMA family; Qwen2 keeps HF order)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class GgufArch:
    name: str  # general.architecture in the GGUF file (what llama.cpp matches against the model)
    permute_qk: bool  # rows of q_proj/k_proj in llama.cpp's rotary order


GGUF_ARCHS = {
    "llama": GgufArch("llama", permute_qk=True),
    "mistral": GgufArch("llama", permute_qk=True),  # llama.cpp converts Mistral as LLaMA
    "qwen2": GgufArch("qwen2", permute_qk=False),
    # MoE families whose experts llama.cpp holds as ffn_{gate,up,down}_exps (E, out, in): their
    # converter stacks the per-expert tensors; LoRA on them is stacked the same way (ops/export_gguf.py)
    "mixtral": GgufArch("llama", permute_qk=True),  # convert_hf_to_gguf.py converts Mixtral as LLaMA
    "qwen2_moe": GgufArch("qwen2moe", permute_qk=False),
    "qwen3_moe": GgufArch("qwen3moe", permute_qk=False),
}


def gguf_arch(name: str) -> GgufArch:
    if name not in GGUF_ARCHS:
        raise UsageError(f"--base-arch {name!r}: GGUF export knows {', '.join(GGUF_ARCHS)}")
    return GGUF_ARCHS[name]
