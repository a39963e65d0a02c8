"""Synthetic LLaMA-shaped checkpoints and adapters for the benchmarks (random weights, real layout).

Written directly with safetensors so that building a 1B model takes seconds and little memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int, kv_dim: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def write_base(out: Path, *, hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int,
               shards: int, dtype=torch.bfloat16, seed: int = 0) -> int:
    """A sharded LlamaForCausalLM checkpoint transformers can load; returns the parameter count."""
    out.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(hidden, intermediate, layers, vocab, hidden // heads * kv_heads)
    gen = torch.Generator().manual_seed(seed)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    per_shard = total / shards
    names = list(shapes)
    weight_map, shard_tensors, shard_size, index = {}, {}, 0, 1
    files = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]

    def flush():
        nonlocal shard_tensors, shard_size, index
        save_file(shard_tensors, str(out / files[index - 1]), metadata={"format": "pt"})
        shard_tensors, shard_size, index = {}, 0, index + 1

    for name in names:
        shape = shapes[name]
        t = torch.ones(shape, dtype=dtype) if len(shape) == 1 else (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        shard_tensors[name] = t
        weight_map[name] = files[index - 1]
        shard_size += t.numel()
        if shard_size >= per_shard and index < shards:
            flush()
    flush()
    nbytes = total * torch.empty((), dtype=dtype).element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": nbytes}, "weight_map": weight_map}, indent=2)
    )
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return total


def write_adapter(out: Path, base_shapes: dict[str, tuple[int, ...]], r: int, alpha: int, targets=PROJECTIONS,
                  dtype=torch.bfloat16, seed: int = 1) -> None:
    """A PEFT LoRA adapter (random A and B) on every `targets` projection of the base."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in base_shapes.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        out_f, in_f = shape
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (torch.randn(r, in_f, generator=gen) / in_f**0.5).to(dtype)
        tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, r, generator=gen) * 0.01).to(dtype)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets), "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "synthetic-llama", "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    """Command line, so benchmarks can build data in a child process and stay small themselves
    (a forked child inherits the parent's RSS until it execs, which would pollute ru_maxrss)."""
    import argparse

    ap = argparse.ArgumentParser(description="write a synthetic LLaMA base and/or an r-rank adapter for it")
    ap.add_argument("--base", type=Path, help="write the base checkpoint here")
    ap.add_argument("--adapter", type=Path, help="write the adapter here")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    dims = dict(hidden=args.hidden, intermediate=args.intermediate, vocab=args.vocab)
    if args.base:
        write_base(args.base, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, shards=args.shards, **dims)
    if args.adapter:
        kv_dim = args.hidden // args.heads * args.kv_heads
        shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab, kv_dim)
        write_adapter(args.adapter, shapes, r=args.r, alpha=2 * args.r, seed=args.seed)


if __name__ == "__main__":
    main()
