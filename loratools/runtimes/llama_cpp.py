"""llama.cpp's LoRA path, as rules (see runtimes/__init__.py for the shape).

Read from convert_lora_to_gguf.py (its converter) and src/llama-adapter.cpp (the loader); the
release read was not recorded, so these rules are not versioned and `--target llama.cpp` takes no
@VERSION. It applies plain B·A scaled by alpha/r, with r read per tensor and one alpha per file:
rank_pattern is honoured, alpha_pattern and rsLoRA are not (the converter writes the config's
lora_alpha); the converter stops on tensors other than lora_A/lora_B.
"""

from __future__ import annotations

from . import Rule, Runtime
from .common import CONV_UNSERVED, FROM_CONV, TO_PLAIN

RULES = (
    Rule("llamacpp-peft-type", "peft_type", "error", "reads peft_type LORA adapters only; this is {peft_type}", TO_PLAIN,
         "convert_lora_to_gguf.py"),
    Rule("llamacpp-unsupported", "gguf_blockers", "error", "cannot take it: {reason}", "", "convert_lora_to_gguf.py"),
    # The loader checks lora_a/lora_b as 2-D against the weight's two dims and applies them as a matrix
    # product (llm_build_lora_mm); the converter's model classes are language models only.
    Rule("llamacpp-conv", "conv", "error", CONV_UNSERVED, FROM_CONV, "src/llama-adapter.cpp, convert_lora_to_gguf.py",
         param="the 2-D weights of the language models it implements (a matrix product)"),
    Rule("llamacpp-scaling", "own_scaling", "warning",
         "scales each module by the file's one lora_alpha over its rank (no rsLoRA, no alpha_pattern): {n} module(s) "
         "are scaled otherwise, e.g. {module} at {own:g}, which its own converter would serve at {served:g}",
         "loratools export ADAPTER OUT.gguf folds each module's scaling in exactly",
         "convert_lora_to_gguf.py, src/llama-adapter.cpp", param="tensor rank"),
    Rule("llamacpp-arch", "gguf_arch", "warning",
         "adapters of {arch} get no GGUF from loratools export, which writes {archs}",
         "llama.cpp's own convert_lora_to_gguf.py may know {arch}",
         "loratools/arch/gguf.py"),
)

LLAMA_CPP = Runtime("llama.cpp", "llama.cpp", None, RULES)
