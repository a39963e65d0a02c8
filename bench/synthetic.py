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
    shapes = llama_shapes(hidden, intermediate, layers, vocab, hidden // heads * kv_heads)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    return write_checkpoint(out, shapes, config, shards, dtype, seed)


def write_checkpoint(out: Path, shapes: dict[str, tuple[int, ...]], config: dict, shards: int, dtype, seed: int) -> int:
    """Random tensors of these shapes (norms 1) in `shards` files with an index, and config.json;
    returns the parameter count."""
    out.mkdir(parents=True, exist_ok=True)
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
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return total


def moe_shapes(hidden: int, expert_intermediate: int, experts: int, layers: int, vocab: int, heads: int,
               kv_heads: int) -> dict[str, tuple[int, ...]]:
    """Qwen3-MoE as transformers saves it: attention, a router, and every expert's three Linears."""
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": (head_dim,),
            p + "self_attn.k_norm.weight": (head_dim,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate.weight": (experts, hidden),
        }
        for e in range(experts):
            shapes |= {
                p + f"mlp.experts.{e}.gate_proj.weight": (expert_intermediate, hidden),
                p + f"mlp.experts.{e}.up_proj.weight": (expert_intermediate, hidden),
                p + f"mlp.experts.{e}.down_proj.weight": (hidden, expert_intermediate),
            }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def write_moe_base(out: Path, *, hidden: int, expert_intermediate: int, experts: int, layers: int, vocab: int,
                   heads: int, kv_heads: int, shards: int, dtype=torch.bfloat16, seed: int = 0) -> int:
    """A sharded Qwen3MoeForCausalLM checkpoint (experts stored one tensor per expert, as on the Hub)."""
    shapes = moe_shapes(hidden, expert_intermediate, experts, layers, vocab, heads, kv_heads)
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": hidden,
        "intermediate_size": 4 * hidden, "moe_intermediate_size": expert_intermediate, "num_experts": experts,
        "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    return write_checkpoint(out, shapes, config, shards, dtype, seed)


def write_moe_adapter(out: Path, base_shapes: dict[str, tuple[int, ...]], experts: int, r: int, alpha: int,
                      dtype=torch.bfloat16, seed: int = 1) -> None:
    """A PEFT adapter as PEFT saves `target_parameters` on transformers 5's fused experts
    (gate_up_proj wrapped first, so one `.base_layer` deeper; A (r·E, in), B (out, r·E)), plus
    LoRA on the four attention projections."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}

    def factors(key: str, out_f: int, in_f: int, rank: int) -> None:
        tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, in_f, generator=gen) / in_f**0.5).to(dtype)
        tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, rank, generator=gen) * 0.01).to(dtype)

    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    for name, shape in base_shapes.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in attention:
            factors(f"base_model.model.{module}", *shape, r)
        elif module.endswith(".mlp.experts.0.gate_proj"):
            layer = module.removesuffix(".mlp.experts.0.gate_proj")
            expert_intermediate, hidden = shape
            factors(f"base_model.model.{layer}.mlp.experts.base_layer", 2 * expert_intermediate, hidden, r * experts)
            factors(f"base_model.model.{layer}.mlp.experts", hidden, expert_intermediate, r * experts)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(attention),
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "synthetic-qwen3-moe", "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None,
        "auto_mapping": {"base_model_class": "Qwen3MoeForCausalLM",
                         "parent_library": "transformers.models.qwen3_moe.modeling_qwen3_moe"},
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


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
    ap.add_argument("--experts", type=int, default=0, help="a Qwen3-MoE base of this many experts per layer "
                    "(--intermediate is then each expert's) and a fused-experts adapter")
    args = ap.parse_args()
    if args.experts:
        moe = dict(hidden=args.hidden, expert_intermediate=args.intermediate, experts=args.experts, layers=args.layers,
                   vocab=args.vocab, heads=args.heads, kv_heads=args.kv_heads)
        if args.base:
            write_moe_base(args.base, shards=args.shards, **moe)
        if args.adapter:
            write_moe_adapter(args.adapter, moe_shapes(**moe), args.experts, r=args.r, alpha=2 * args.r, seed=args.seed)
        return
    dims = dict(hidden=args.hidden, intermediate=args.intermediate, vocab=args.vocab)
    if args.base:
        write_base(args.base, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, shards=args.shards, **dims)
    if args.adapter:
        kv_dim = args.hidden // args.heads * args.kv_heads
        shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab, kv_dim)
        write_adapter(args.adapter, shapes, r=args.r, alpha=2 * args.r, seed=args.seed)


if __name__ == "__main__":
    main()
