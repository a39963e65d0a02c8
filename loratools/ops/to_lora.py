"""`loratools convert --to-lora`: the same ΔW in every module, as the plainest LoRA there is —
scaling 1 everywhere.

Serving runtimes apply one scaling rule to a whole adapter (vLLM: the config's lora_alpha/r,
ignoring rank_pattern and alpha_pattern; llama.cpp: one alpha per file). An adapter whose
modules each have scaling 1 is read the same by all of them and by PEFT: each B becomes s·B
(float32, so no rounding beyond that one product), A is kept, and every module gets
lora_alpha = its rank (use_rslora off), pinned by exact patterns where it differs from the
most common one. A lora_B.bias, added as s·bias when merged, becomes s·bias too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adapter import Adapter
from ..config import with_module_ranks
from ..errors import UnsupportedError


@dataclass
class ToLoraReport:
    modules: int
    rescaled: list[str] = field(default_factory=list)  # modules whose scaling was not already 1


def to_plain_lora(adapter: Adapter) -> tuple[Adapter, ToLoraReport]:
    adapter.require_supported("convert")
    for path, module in adapter.modules.items():
        if module.magnitude_key or module.diag_key:
            what = "DoRA" if module.magnitude_key else "KaSA"
            raise UnsupportedError(f"module {path}: {what} is not a plain LoRA and its ΔW depends on the base weight; "
                                   "merge it into the base instead (loratools merge)", code="unsupported")
    tensors = adapter.state_dict()
    ranks: dict[str, tuple[int, float]] = {}
    report = ToLoraReport(len(adapter.modules))
    for path, module in adapter.modules.items():
        ranks[path] = (module.rank, float(module.rank))  # alpha = r: scaling 1
        if module.scaling == 1.0:
            continue
        report.rescaled.append(path)
        tensors[module.b_key] = tensors[module.b_key].to(torch.float32) * module.scaling
        tensors[module.a_key] = tensors[module.a_key].to(torch.float32)
        if module.lora_bias_key:
            tensors[module.lora_bias_key] = tensors[module.lora_bias_key].to(torch.float32) * module.scaling
    raw = with_module_ranks(adapter.config.raw, ranks, use_rslora=False)
    return Adapter.from_tensors(raw, tensors, source=adapter.source), report
