"""`validate --target vllm|llama.cpp`: what each serving runtime does with an adapter that PEFT
loads, as findings with a fix. The rules, from the runtimes' own loaders:

vLLM (vllm/lora/peft_helper.py): reads r, lora_alpha, use_rslora, use_dora, bias,
modules_to_save and target_modules from adapter_config.json — nothing else. It refuses DoRA and
modules_to_save, refuses a rank above the server's --max-lora-rank (one of 1, 8, 16, 32, 64,
128, 256, 320, 512; default 16) and bias ≠ "none" unless bias support is enabled, and scales every
module by lora_alpha/r (or /√r): rank_pattern and alpha_pattern are ignored, so a module with its
own scaling is served with the wrong one, silently. Tensors it has no slot for (lora_bias,
KaSA's lora_diag, trainable tokens) are rejected as unexpected modules.

llama.cpp (convert_lora_to_gguf.py, llama-adapter): applies plain B·A scaled by alpha/r, with r
read per tensor and one alpha per file: rank_pattern is honoured, alpha_pattern and rsLoRA are
not (its converter writes the config's lora_alpha). Its converter stops on tensors other than
lora_A/lora_B (DoRA magnitudes, lora_bias, modules_to_save, trainable tokens).
"""

from __future__ import annotations

from typing import Callable

from ..adapter import Adapter
from ..arch import Role
from ..arch.gguf import GGUF_ARCHS
from .export_gguf import gguf_blockers

TARGETS = ("vllm", "llama.cpp")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

Add = Callable[..., None]  # add(code, severity, message, module=None)


def check_target(adapter: Adapter, target: str, add: Add, error: str, warning: str) -> None:
    """Add a finding for every rule of `target` the adapter breaks."""
    if adapter.origin != "LORA":  # both read peft_type LORA files only (lora_A.weight, lora_B.weight)
        add(f"{'vllm' if target == 'vllm' else 'llamacpp'}-peft-type", error,
            f"{target} reads LoRA adapters only, this is {adapter.origin}: loratools convert ADAPTER OUT --to-lora writes "
            "the equivalent plain LoRA")
    (_vllm if target == "vllm" else _llama_cpp)(adapter, add, error, warning)


def _vllm(adapter: Adapter, add: Add, error: str, warning: str) -> None:
    cfg = adapter.config
    dora = [p for p, m in adapter.modules.items() if m.magnitude_key]
    if cfg.use_dora or dora:
        add("vllm-dora", error, "vLLM refuses DoRA adapters; merge it into the base (loratools merge) and serve the merged model")
    to_save = [e.target for e in adapter.extras if e.kind == "modules_to_save"]
    if cfg.modules_to_save or to_save:
        add("vllm-modules-to-save", error, f"vLLM refuses modules_to_save ({', '.join(cfg.modules_to_save or to_save)}): "
            "merge the adapter (loratools merge), or retrain without modules_to_save")
    rank = max((m.rank for m in adapter.modules.values()), default=0)
    if rank > VLLM_RANKS[-1]:
        add("vllm-rank", error, f"rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]}): "
            "reduce it (loratools resize --rank 512) or merge")
    elif rank > 16:
        need = next(r for r in VLLM_RANKS if r >= rank)
        add("vllm-rank", warning, f"rank {rank}: start vLLM with --max-lora-rank {need} or more (its default, 16, refuses this adapter)")
    if cfg.bias != "none":
        add("vllm-bias", warning, f"bias={cfg.bias!r}: vLLM refuses it unless LoRA bias support is enabled "
            "(--enable-lora-bias, in the versions that have it); merge for an exact model")
    for path, module in adapter.modules.items():
        if module.lora_bias_key or module.diag_key:
            what = "lora_bias (lora_B.bias)" if module.lora_bias_key else "KaSA (lora_diag)"
            add("vllm-tensor", error, f"module {path}: {what}: vLLM has no slot for it and rejects the adapter; merge it", path)
    if adapter.trainable_tokens:
        add("vllm-tensor", error, "trainable_token_indices: vLLM rejects trainable_tokens_delta; merge it")
    wrong = [p for p, m in adapter.modules.items() if not m.magnitude_key and m.scaling != cfg.default_scaling]
    if wrong:
        add("vllm-scaling", error,
            f"{len(wrong)} module(s) have their own scaling (rank_pattern/alpha_pattern), which vLLM ignores: it scales every "
            f"module by {cfg.default_scaling:g}, so e.g. {wrong[0]} would be served at {cfg.default_scaling:g} instead of "
            f"{adapter.modules[wrong[0]].scaling:g}; run loratools convert ADAPTER OUT --to-lora (folds each scaling into B)",
            wrong[0])
    embeds = [p for p, m in adapter.modules.items() if m.role in (Role.TOKEN_EMBED, Role.LM_HEAD)]
    if embeds:
        add("vllm-embedding", warning, f"LoRA on {', '.join(embeds)}: vLLM applies embedding/lm_head LoRA only for models "
            "that declare them; check your model's support, or merge", embeds[0])


def _llama_cpp(adapter: Adapter, add: Add, error: str, warning: str) -> None:
    cfg = adapter.config
    for path, reason in gguf_blockers(adapter):
        add("llamacpp-unsupported", error, reason, path)
    rescaled = [p for p, m in adapter.modules.items() if m.scaling * m.rank != cfg.lora_alpha]
    if rescaled:
        add("llamacpp-scaling", warning,
            f"{len(rescaled)} module(s) are scaled other than lora_alpha/r (rsLoRA or alpha_pattern), which llama.cpp's own "
            "converter drops (one alpha per file); loratools export ADAPTER OUT.gguf folds each scaling in exactly", rescaled[0])
    if adapter.architecture is not None and adapter.architecture not in GGUF_ARCHS:
        add("llamacpp-arch", warning, f"loratools export writes GGUF for {', '.join(GGUF_ARCHS)}, not "
            f"{adapter.architecture}; llama.cpp's convert_lora_to_gguf.py may know it")
