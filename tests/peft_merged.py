"""PEFT's reference for a model saved by transformers: the PEFT model's logits and its
merge_and_unload saved by save_pretrained (shared by the multimodal and family tests)."""

from __future__ import annotations

import warnings

import torch

from tests.merged import merged_tensors


def randomise_b(model, seed: int) -> None:
    """Every lora_B drawn from a fixed seed (PEFT initialises B to zero: ΔW would be 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def peft_reference(auto_class, base_dir, adapter_dir, out_dir, inputs: dict):
    """(the PEFT model's logits on `inputs`, PEFT's merge_and_unload saved by transformers, as tensors)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(auto_class.from_pretrained(str(base_dir)), str(adapter_dir)).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    model.merge_and_unload().save_pretrained(str(out_dir))
    return logits, merged_tensors(out_dir)
