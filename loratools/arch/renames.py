"""The names transformers gives a tensor in memory and on disk, where they differ: the key renames
of transformers' conversion_mapping.py that touch a language model's weights, as data (no torch).

transformers 5 builds a multimodal ConditionalGeneration model as `model.language_model.…` (plus
`model.vision_tower.…` and so on) and PEFT names adapters after that module tree; checkpoints
written before transformers 4.52 — and what transformers 5.23's own save_pretrained writes back —
keep the older layout (`language_model.model.…` for LLaVA-style models, `model.…` for Qwen2-VL).
Checkpoints saved by transformers 4.52–4.57 use the module tree's names. Adapters come in both
layouts too (PEFT on transformers 4.x named them after the older tree). A base tensor is therefore
looked up under every name the table allows; only one of them is in a given checkpoint.

Each rename is a prefix (anchored at the start of the name, on a dot boundary) or an infix
(`.block_sparse_moe.` <-> `.mlp.`), in the checkpoint's spelling and the module tree's.
tests/test_conversion_tables.py holds this table against transformers' own mapping for every
model_type it lists with renames of text weights.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rename:
    checkpoint: str  # the checkpoint's spelling
    module: str  # the module tree's (transformers >= 4.52 in memory; PEFT's adapter names)
    infix: bool = False  # False: a prefix of the whole name; True: a ".x." part anywhere in it

    def apply(self, name: str, to_module: bool) -> str | None:
        """`name` with this rename applied in one direction, or None when it does not match."""
        old, new = (self.checkpoint, self.module) if to_module else (self.module, self.checkpoint)
        if self.infix:
            return name.replace(old, new, 1) if old in name else None
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
        return None


# LLaVA and the models transformers maps to it: the text decoder was `language_model.model` and
# its head `language_model.lm_head`; the towers sat at the root.
_LLAVA = (
    Rename("language_model.model", "model.language_model"),
    Rename("language_model.lm_head", "lm_head"),
    Rename("vision_tower", "model.vision_tower"),
    Rename("multi_modal_projector", "model.multi_modal_projector"),
)
# Qwen2-VL, Qwen2.5-VL: the text decoder was `model` itself, beside `visual`.
_QWEN2_VL = (
    Rename("model", "model.language_model"),
    Rename("visual", "model.visual"),
)
# Mixtral's sparse block was `block_sparse_moe` (its experts are converted too: arch/experts.py).
_MIXTRAL = (Rename(".block_sparse_moe.", ".mlp.", infix=True),)

# The text-only model of a multimodal family loads the multimodal checkpoint's text decoder.
_TEXT_OF_MULTIMODAL = (Rename("model.language_model", "model"),)

RENAMES: dict[str, tuple[Rename, ...]] = {
    **{t: _LLAVA for t in ("llava", "gemma3", "mistral3", "aya_vision", "paligemma", "internvl", "vipllava", "got_ocr2",
                           "aria", "llava_next", "llava_onevision", "llava_next_video", "video_llava", "fuyu", "mllama",
                           "kimi_k25", "qianfan_ocr",
                           # audio models around a text decoder, laid out the same way
                           "qwen2_audio", "voxtral", "voxtral_realtime", "audioflamingo3", "glmasr", "musicflamingo",
                           "granite_speech", "granite_speech_plus", "vibevoice_asr")},
    "minimax_m3_vl": _LLAVA + (Rename(".block_sparse_moe.", ".mlp.", infix=True),),
    **{t: _QWEN2_VL for t in ("qwen2_vl", "qwen2_5_vl", "hunyuan_vl", "paddleocr_vl", "step3p7", "dots3_note")},
    **{t: _MIXTRAL for t in ("mixtral", "minimax", "minimax_m2", "kimi_linear")},
    **{t: _TEXT_OF_MULTIMODAL for t in ("qwen3_5_text", "qwen3_5_moe_text", "qwen4_exp_text", "gemma3n_text")},
}

# model_types whose transformers renames touch text weights but are not in RENAMES, and why
# (tests/test_conversion_tables.py fails on any other).
NOT_COVERED: dict[str, str] = {
    "phimoe": "renames the router too (block_sparse_moe.gate -> mlp.router): not a prefix or infix rename",
    "mistral_large4_text": "nests the router (block_sparse_moe.gate -> block_sparse_moe.mlp.gate)",
    "pp_chart2table": "keeps the text decoder's own `model.` inside `model.language_model`",
    "qwen2_5_omni_thinker": "checkpoints nest the thinker under `thinker.` beside a talker",
    "qwen3_omni_moe_thinker": "checkpoints nest the thinker under `thinker.` beside a talker",
    "ernie4_5_vl_moe": "fuses and splits text and vision experts",
    "deepseek_ocr2": "its text decoder is nested inside `language_model` twice",
    "unlimited_ocr": "its text decoder is nested inside `language_model` twice",
    "t5gemma2_encoder": "an encoder-decoder, not a decoder-only text model",
    "shieldgemma2": "a classifier around Gemma 3",
    "timm_wrapper": "vision-only",
    "pi0": "a robotics policy; drops the `model.` prefix",
}

# The text decoder inside a multimodal model, and the CausalLM that is that decoder alone:
# (the CausalLM's prefix, the multimodal module tree's). The text weights are the same tensors,
# so an adapter of one applies to the other's checkpoint.
TEXT_DECODER = (Rename("model", "model.language_model"),)
# The text-only model_types whose CausalLM is the text decoder of a multimodal model_type
# (transformers' default text_config; a checkpoint's own text_config.model_type also counts).
TEXT_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "gemma3": ("gemma3_text",),
    "mistral3": ("mistral", "ministral"),
    "llava": ("llama",),
    "qwen2_5_vl": ("qwen2_5_vl_text",),
    "qwen2_vl": ("qwen2_vl_text",),
}


def _convert(model_type: str | None, name: str, to_module: bool) -> str:
    renames = RENAMES.get(model_type or "", ())
    # The longest prefix that matches says which spelling `name` is in (Qwen2-VL's checkpoint
    # `model.` is a prefix of its module tree's `model.language_model.`, and the reverse for the
    # text-only models of multimodal families); it is converted only from the other spelling.
    matches = [(len(r.checkpoint), True, r) for r in renames if not r.infix and r.apply(name, to_module=True) is not None]
    matches += [(len(r.module), False, r) for r in renames if not r.infix and r.apply(name, to_module=False) is not None]
    if matches:
        _, stored, rename = max(matches, key=lambda m: m[0])
        if stored == to_module:
            name = rename.apply(name, to_module)
    for rename in renames:
        renamed = rename.apply(name, to_module) if rename.infix else None
        if renamed is not None:
            return renamed
    return name


def module_name(model_type: str | None, name: str) -> str:
    """`name` (a checkpoint's, or already the module tree's) in the module tree's spelling."""
    return _convert(model_type, name, to_module=True)


def checkpoint_name(model_type: str | None, name: str) -> str:
    """`name` in the older checkpoint layout (what transformers 5.23's save_pretrained writes)."""
    return _convert(model_type, name, to_module=False)


def alternatives(model_types: tuple[str | None, ...], name: str) -> list[str]:
    """Every name the tensor `name` (from an adapter: either layout, or a CausalLM's name for a
    multimodal model's text decoder, or the reverse) may have in a checkpoint of one of these
    model_types, `name` first."""
    out = [name]
    forms = [name]
    for rename in TEXT_DECODER:  # a CausalLM adapter on a multimodal base, and the reverse
        forms += [n for n in (rename.apply(name, True), rename.apply(name, False)) if n is not None]
    for model_type in model_types:
        if model_type not in RENAMES:
            continue
        for form in forms:
            module = module_name(model_type, form)
            out += [form, module, checkpoint_name(model_type, module)]
    out += forms
    return list(dict.fromkeys(out))


def shares_text_decoder(adapter_family: str | None, base_model_type: str | None, base_config: dict | None = None) -> bool:
    """Whether one of the two is a multimodal model and the other its text decoder alone (a
    CausalLM adapter on a multimodal checkpoint, or the reverse): the same text tensors."""
    if adapter_family is None or base_model_type is None:
        return False
    text_config = (base_config or {}).get("text_config")
    text_types = set(TEXT_MODEL_TYPES.get(base_model_type, ()))
    if isinstance(text_config, dict) and isinstance(text_config.get("model_type"), str):
        text_types.add(text_config["model_type"])
    return adapter_family in text_types or base_model_type in TEXT_MODEL_TYPES.get(adapter_family, ())


def is_multimodal(model_type: str | None) -> bool:
    return model_type in TEXT_MODEL_TYPES
