"""PEFT as the reference: load adapters the way users do and compute what PEFT computes."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from tests.tiny_models import build_base


def peft_model(base, adapter_dir: str | Path):
    """PeftModel.from_pretrained on a fresh tiny base (a family name, or a function building the
    model); fails on any missing or unexpected key."""
    from peft import PeftModel

    build = (lambda: build_base(base)) if isinstance(base, str) else base
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(build(), str(adapter_dir))
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    # The same load, step by step, to see the incompatible keys PEFT itself computes.
    from peft import PeftConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict

    fresh = get_peft_model(build(), PeftConfig.from_pretrained(str(adapter_dir)))
    result = set_peft_model_state_dict(fresh, load_peft_weights(str(adapter_dir)))
    adapter_missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    assert adapter_missing == [] and list(result.unexpected_keys) == [], result
    return model.eval()


def sample_inputs(base: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(42)
    ids = torch.randint(0, 64, (2, 7), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def outputs(model, base: str) -> torch.Tensor:
    return model(**sample_inputs(base)).logits


AUTO_CLASS = {"llama": "AutoModelForCausalLM", "gpt2": "AutoModelForCausalLM", "bert": "AutoModelForSequenceClassification"}


def load_base(family: str, base_dir: str | Path, dtype: torch.dtype | None = None):
    """A base checkpoint loaded by transformers, the way a user would."""
    import transformers

    cls = getattr(transformers, AUTO_CLASS[family])
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return cls.from_pretrained(str(base_dir), **kwargs).eval()


def peft_merged_state_dict(family: str, base_dir, adapter_dir, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """transformers from_pretrained -> PeftModel.from_pretrained -> merge_and_unload."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(family, base_dir, dtype), str(adapter_dir))
    merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
