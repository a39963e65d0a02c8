"""Benchmark `loratools merge` of a mixture-of-experts base against the dense one, both against
the I/O floor (cp -r), same run.

    .venv/bin/python bench/moe_bench.py [--layers 24] [--dense-layers 22] [--repeat 5] [--workdir DIR]

Builds a synthetic Qwen3-MoE bf16 base (hidden 1024, 8 experts of intermediate 1408 per layer,
stored one tensor per expert as on the Hub: 24 layers is ~1B parameters) in 4 shards, with an
r=16 adapter on the attention projections and on the fused experts (PEFT's target_parameters:
each expert's ΔW is placed into its three per-expert tensors), and the dense LLaMA-shaped base of
merge_bench.py (~1.1B). Target: the MoE merge's ratio to cp within 10% of the dense merge's;
peak RSS within the largest shard + 512 MiB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import LORATOOLS, SYNTHETIC  # noqa: E402  (stdlib only: this process must stay small)
from merge_bench import build as build_dense  # noqa: E402
from merge_bench import interleaved  # noqa: E402

MOE_SHAPE = ["--hidden", "1024", "--intermediate", "1408", "--experts", "8", "--heads", "16", "--kv-heads", "4"]


def build_moe(work: Path, layers: int) -> tuple[Path, Path, int, int]:
    base, adapter = work / f"moe-base-{layers}", work / f"moe-adapter-{layers}"
    subprocess.run([sys.executable, SYNTHETIC, "--base", str(base), "--adapter", str(adapter), "--layers", str(layers),
                    *MOE_SHAPE], check=True)
    params = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2  # bf16
    largest = max(p.stat().st_size for p in base.glob("*.safetensors"))
    return base, adapter, params, largest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--dense-layers", type=int, default=22)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lt-moe-bench-", dir=args.workdir))
    out = work / "out"
    try:
        moe = build_moe(work, args.layers)
        dense = build_dense(work, args.dense_layers)
        contenders = {}
        for kind, (base, adapter, _, _) in (("moe", moe), ("dense", dense)):
            contenders[f"cp {kind}"] = (["cp", "-r", str(base), str(out)], [base])
            contenders[f"loratools {kind}"] = (
                [LORATOOLS, "merge", str(base), str(adapter), str(out), "--quiet"], [base, adapter])
        times = interleaved(contenders, out, args.repeat)
        print(f"{'':34}{'returns':>9}{'+ sync':>9}{'peak RSS':>12}")
        ratios, fastest = {}, {}
        for kind, (_, _, params, largest) in (("moe", moe), ("dense", dense)):
            cp, lt = times[f"cp {kind}"], times[f"loratools {kind}"]
            label = "MoE, 8 experts" if kind == "moe" else "dense"
            print(f"{label}: {params / 1e9:.2f}B params, bf16, 4 shards (largest {largest / 2**20:.0f} MiB)")
            print(f"  {'cp -r':32}{cp[0]:8.2f}s{cp[1]:8.2f}s")
            print(f"  {'loratools merge':32}{lt[0]:8.2f}s{lt[1]:8.2f}s{lt[2] / 2**20:8.0f} MiB")
            ratios[kind] = (lt[0] / cp[0], lt[1] / cp[1])
            fastest[kind] = (lt.fastest_returned / cp.fastest_returned, lt.fastest_durable / cp.fastest_durable)
            print(f"  loratools / cp                  {ratios[kind][0]:5.2f}x / {ratios[kind][1]:5.2f}x (returns / + sync)")
            print(f"  peak RSS - largest shard        {(lt[2] - largest) / 2**20:+6.0f} MiB (target <= +512 MiB)")
        print("MoE ratio / dense ratio           "
              f"{ratios['moe'][0] / ratios['dense'][0]:5.2f}x / {ratios['moe'][1] / ratios['dense'][1]:5.2f}x   (target <= 1.10x)")
        print("  the same from the fastest runs   "
              f"{fastest['moe'][0] / fastest['dense'][0]:5.2f}x / {fastest['moe'][1] / fastest['dense'][1]:5.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
