"""Benchmark `loratools merge` on a pre-quantized NF4 base against the transformers + PEFT route.

    .venv/bin/python bench/qlora_bench.py [--layers 22] [--repeat 3] [--workdir DIR] [--skip-route]

Builds the synthetic LLaMA-shaped bf16 base of merge_bench.py (22 layers: ~1.1B parameters) and
its r=16 adapter, quantizes the base with transformers + bitsandbytes (nf4, double quant, on the
CPU) and saves it the way QLoRA users have it. Then, each in its own process, same run:

- loratools merge NF4-BASE ADAPTER OUT (dequantize in the stream, merge, write bf16);
- loratools merge BF16-BASE ADAPTER OUT: the plain merge of the same shapes (target: the nf4
  merge within 1.25x of it);
- the route users take today: from_pretrained(quantized) -> model.dequantize() ->
  PeftModel.from_pretrained -> merge_and_unload -> save (sharded safetensors).

Prints wall times, peak RSS and their ratios (absolute times drift on shared machines).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import LORATOOLS  # noqa: E402  (stdlib only: this process must stay small)
from merge_bench import build, interleaved

QUANTIZE = """
import sys, torch, transformers
base, out = sys.argv[1:]
config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.bfloat16)
model = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu")
model.save_pretrained(out, max_shard_size="300MB")
"""

# save_pretrained after dequantize() raises NotImplementedError in transformers 5.23 (it tries
# to reverse the 4-bit weight conversions); the state dict is saved with huggingface_hub instead.
TRANSFORMERS_ROUTE = """
import sys, torch, transformers, peft, huggingface_hub
base, adapter, out = sys.argv[1:]
model = transformers.AutoModelForCausalLM.from_pretrained(base, device_map="cpu")
model.dequantize()
model = peft.PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
import os; os.makedirs(out)
huggingface_hub.save_torch_state_dict(model.state_dict(), out, max_shard_size="600MB")
model.config.save_pretrained(out)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--skip-route", action="store_true", help="only loratools on the nf4 and the bf16 base")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lt-qbench-", dir=args.workdir))
    out = work / "out"
    try:
        base16, adapter, params, _ = build(work, args.layers)
        base4 = work / "base-nf4"
        subprocess.run([sys.executable, "-c", QUANTIZE, str(base16), str(base4)], check=True, stderr=subprocess.DEVNULL)
        shards = list(base4.glob("*.safetensors"))
        largest = max(p.stat().st_size for p in shards)
        times = interleaved(
            {
                "loratools": ([LORATOOLS, "merge", str(base4), str(adapter), str(out), "--quiet"], [base4, adapter]),
                "plain": ([LORATOOLS, "merge", str(base16), str(adapter), str(out), "--quiet"], [base16, adapter]),
            },
            out,
            args.repeat,
        )
        lt, plain = times["loratools"], times["plain"]
        shutil.rmtree(base16)  # the route must not find the 16-bit weights in the page cache
        route = None
        if not args.skip_route:
            route = interleaved({"route": ([sys.executable, "-c", TRANSFORMERS_ROUTE, str(base4), str(adapter), str(out)],
                                           [base4, adapter])}, out, args.repeat)["route"]
        size = sum(p.stat().st_size for p in shards)
        print(f"base: {params / 1e9:.2f}B params as nf4 + double quant, {len(shards)} shards, {size / 2**20:.0f} MiB "
              f"(largest {largest / 2**20:.0f} MiB); adapter r=16 on 7 projections; output bf16")
        print(f"{'':34}{'returns':>9}{'+ sync':>9}{'peak RSS':>12}")
        print(f"  {'loratools merge':32}{lt[0]:8.2f}s{lt[1]:8.2f}s{lt[2] / 2**20:8.0f} MiB")
        print(f"  {'  the same on the bf16 base':32}{plain[0]:8.2f}s{plain[1]:8.2f}s{plain[2] / 2**20:8.0f} MiB")
        if route:
            print(f"  {'transformers dequantize + PEFT':32}{route[0]:8.2f}s{route[1]:8.2f}s{route[2] / 2**20:8.0f} MiB")
        print("ratios:")
        print(f"  nf4 / bf16 merge         {lt[0] / plain[0]:5.2f}x / {lt[1] / plain[1]:5.2f}x (+ sync)   (target <= 1.25x)")
        if route:
            print(f"  route / loratools time   {route[0] / lt[0]:5.1f}x / {route[1] / lt[1]:5.1f}x (+ sync)")
            print(f"  route / loratools RSS    {route[2] / lt[2]:5.1f}x")
        print(f"  loratools peak RSS - largest shard {(lt[2] - largest) / 2**20:+6.0f} MiB (streamed: a shard + a few tensors)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
