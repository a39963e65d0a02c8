"""Real quantized checkpoints for the tests, made on the CPU: bitsandbytes 4-bit as transformers
saves it, and block-scaled FP8 as DeepSeek/Qwen3-FP8 checkpoints store it."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

ADAPTED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_causal_lm(family: str, seed: int = 0, intermediate_size: int = 96):
    """A tiny LLaMA or Qwen2 (q/k/v biases) whose weights span several quantization blocks."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg = tf.LlamaConfig(**common) if family == "llama" else tf.Qwen2Config(**common)
    model = (tf.LlamaForCausalLM if family == "llama" else tf.Qwen2ForCausalLM)(cfg)
    return model.to(torch.bfloat16).eval()


def save_bf16(family: str, out: Path, seed: int = 0) -> Path:
    tiny_causal_lm(family, seed).save_pretrained(out)
    return out


def save_bnb4(base16: Path, out: Path, quant_type: str = "nf4", double_quant: bool = True, max_shard_size=None) -> Path:
    """from_pretrained(..., BitsAndBytesConfig(load_in_4bit)) then save_pretrained: the checkpoint QLoRA users have."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(base16), quantization_config=config, device_map="cpu")
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def load_bnb4(path: Path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu").eval()


def rewrite_bnb_blocksize(base4: Path, blocksize: int) -> Path:
    """Re-quantize every 4-bit weight of a checkpoint with another blocksize, serialized the way
    bitsandbytes' QuantState.as_dict(packed=True) does (transformers offers only 64)."""
    import bitsandbytes.functional as F
    from safetensors.torch import load_file, save_file

    quantized, out = split_bnb4(load_file(str(base4 / "model.safetensors")))
    for weight, (packed, state) in quantized.items():
        values = reference_dequantize_4bit(packed, state)
        packed, new = F.quantize_4bit(values, blocksize=blocksize, quant_type=state.quant_type, compress_statistics=state.nested)
        out[weight] = packed
        for key, value in new.as_dict(packed=True).items():
            out[f"{weight}.{key}"] = value
    save_file(out, str(base4 / "model.safetensors"), metadata={"format": "pt"})
    return base4


def _bnb_weights(tensors) -> set[str]:
    return {n.split(".quant_state.")[0] for n in tensors if ".quant_state." in n}


def split_bnb4(tensors: dict[str, torch.Tensor]):
    """A checkpoint's tensors as ({4-bit weight: (its packed codes, the QuantState bitsandbytes
    reads for it)}, {every other tensor}): the scales, code maps and quant states go into the states."""
    import bitsandbytes.functional as F

    weights = _bnb_weights(tensors)
    def state(w):
        parts = {n.removeprefix(w + "."): t for n, t in tensors.items() if n.startswith(w + ".")}
        return F.QuantState.from_dict(parts, torch.device("cpu"))

    quantized = {w: (tensors[w], state(w)) for w in weights}
    rest = {n: t for n, t in tensors.items() if not any(n == w or n.startswith(w + ".") for w in weights)}
    return quantized, rest


def reference_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """A bitsandbytes 4-bit weight by the format's definition, with no bitsandbytes kernel:
    element i of the flattened weight is quant_map[code_i] * absmax[i // blocksize] in float32
    (codes two per byte, high nibble first); with double quant absmax_j is first
    nested_quant_map[absmax_j] * nested_absmax[j // nested_blocksize] + offset (float32); the
    product is rounded to the quant state's dtype. `state`: a bitsandbytes QuantState.

    The reference of every QLoRA test: on AVX-512 CPUs bitsandbytes' native CPU dequantize_4bit
    indexes the scales per row (csrc/cpu_ops.cpp), wrong when a row is not whole blocks, and a
    4-bit model on the CPU computes with that kernel."""
    count = math.prod(state.shape)
    data = packed.contiguous().view(torch.uint8).reshape(-1)
    codes = torch.stack([data >> 4, data & 0x0F], dim=1).reshape(-1)[:count].long()
    absmax = state.absmax.reshape(-1)
    if state.nested:
        nested = state.state2
        scale = nested.absmax.float()[torch.arange(absmax.numel()) // nested.blocksize]
        absmax = nested.code.float()[absmax.long()] * scale + state.offset.float()
    values = state.code.float()[codes] * absmax.float()[torch.arange(count) // state.blocksize]
    return values.to(state.dtype).reshape(state.shape)


def reference_dequantized_checkpoint(base4: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A bitsandbytes 4-bit checkpoint (all its shards) as the plain model it holds: (every 4-bit
    weight by `reference_dequantize_4bit`, every other tensor as stored)."""
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(base4.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    quantized, rest = split_bnb4(tensors)
    return {w: reference_dequantize_4bit(packed, state) for w, (packed, state) in quantized.items()}, rest


def load_reference_model(base4: Path, dtype: torch.dtype = torch.bfloat16):
    """The model a 4-bit checkpoint holds as a plain transformers model, with no bitsandbytes
    kernel in it: every 4-bit Linear an nn.Linear of `reference_dequantize_4bit` of its saved
    codes (in the quant state's dtype, then cast to `dtype`, exactly)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base4))
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    weights, rest = reference_dequantized_checkpoint(base4)
    model.load_state_dict({**rest, **weights}, strict=True)
    return model.to(dtype).eval()


def save_fp8(base16: Path, out: Path, block: list[int] | None = None) -> Path:
    """The bf16 checkpoint with every adapted projection stored as e4m3 + weight_scale_inv per block
    (scale = block amax / 448), and config.json's quantization_config as FP8 checkpoints carry it."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(base16 / "model.safetensors"))
    bs = block or [128, 128]
    out.mkdir(parents=True)
    result = {}
    for name, w in tensors.items():
        if not any(f".{m}.weight" in name for m in ADAPTED):
            result[name] = w
            continue
        w = w.float()
        rows, cols = -(-w.shape[0] // bs[0]), -(-w.shape[1] // bs[1])
        scale = torch.ones(rows, cols)
        q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
        for i in range(rows):
            for j in range(cols):
                blk = w[i * bs[0]:(i + 1) * bs[0], j * bs[1]:(j + 1) * bs[1]]
                scale[i, j] = blk.abs().max() / 448
                q[i * bs[0]:(i + 1) * bs[0], j * bs[1]:(j + 1) * bs[1]] = (blk / scale[i, j]).to(torch.float8_e4m3fn)
        result[name] = q
        result[name + "_scale_inv"] = scale
    save_file(result, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base16 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    if block is not None:
        config["quantization_config"]["weight_block_size"] = block
    (out / "config.json").write_text(json.dumps(config))
    return out


def fp8_reference_dequant(q: torch.Tensor, scale_inv: torch.Tensor, block: list[int]) -> torch.Tensor:
    """The block dequantization FP8 checkpoints are read with: value * scale of its block, float32."""
    expanded = scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: q.shape[0], : q.shape[1]]
    return q.float() * expanded.float()


def qlora_adapter(base4: Path, out: Path, seed: int = 1, targets=tuple(ADAPTED), **lora) -> Path:
    """A QLoRA adapter: PEFT on the 4-bit model, random (trained-looking) factors."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, **lora)
    model = get_peft_model(load_bnb4(base4), config)
    model.save_pretrained(out)
    return out
