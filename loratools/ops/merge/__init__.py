"""The merge engine: an adapter merged into base weights, streaming, as PEFT's merge_and_unload.

    plan.py          plan_merge: every check and every decision, from headers (no torch, no writes)
    bounds.py        the plan's proof that every merged tensor is finite in its dtype
    run.py           merge_checkpoint: executes a plan into OUT, atomically
    workers.py       shards merged in forked worker processes
    shard.py         one shard streamed, tensor by tensor, as the plan says
    kernel_numpy.py  plain LoRA on CPU without torch
    kernel_torch.py  everything else (DoRA, KaSA, rows, lora_bias, other dtypes, a GPU)

`loratools.ops.merge` is the engine's public face: what it exports here is what callers use.
"""

from .plan import DTYPE_CODES, MergePlan, OutputTensor, PlanReport, TensorOps, plan_merge
from ..device import resolve_device, resolve_device_name
from .run import MergeReport, merge_checkpoint

__all__ = ["DTYPE_CODES", "MergePlan", "MergeReport", "OutputTensor", "PlanReport", "TensorOps", "merge_checkpoint", "plan_merge",
           "resolve_device", "resolve_device_name"]
