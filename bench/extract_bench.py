"""Benchmark `loratools extract` against mergekit's `mergekit-extract-lora`, same run, same files.

    .venv/bin/python bench/extract_bench.py --mergekit /path/to/venv/bin/mergekit-extract-lora [--layers 22] [--rank 16]

mergekit is not a dependency of loratools (it pins its own transformers); install it in a venv of
its own: `python -m venv mk && mk/bin/pip install torch==2.13.0 mergekit`.
Builds the synthetic LLaMA-shaped bf16 base of merge_bench (22 layers: ~1.1B parameters, 4
shards) and a fine-tune = loratools merge of an r=16 adapter on all seven projections, then times
both extractors in their own processes (wall time, peak RSS) and checks how well each recovers ΔW.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import LORATOOLS
from merge_bench import build, prepare, run

RECOVERY = """
import sys, torch, json
from safetensors.torch import load_file
import loratools
original, extracted = (loratools.load_adapter(p) for p in sys.argv[1:3])
worst = 0.0
for path in original.modules:
    want = original.delta(path)
    key = next(p for p in extracted.modules if p.endswith(path) or path.endswith(p))
    got = extracted.delta(key)
    worst = max(worst, float(torch.linalg.norm(got - want) / torch.linalg.norm(want)))
print(json.dumps({"modules": len(extracted.modules), "worst_relative_error": worst}))
"""


def recovery(original: Path, extracted: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", RECOVERY, str(original), str(extracted)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", required=True, help="the mergekit-extract-lora executable")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lt-extract-", dir=args.workdir))
    try:
        base, adapter, params, largest = build(work, args.layers)
        tuned = work / "tuned"
        subprocess.run([LORATOOLS, "merge", str(base), str(adapter), str(tuned), "--quiet"], check=True)
        ours, theirs = work / "ours", work / "theirs"
        prepare([base, tuned], ours)
        lt = run([LORATOOLS, "extract", str(base), str(tuned), str(ours), "--rank", str(args.rank), "--json"])
        prepare([base, tuned], theirs)
        mk = run([args.mergekit, "--model", str(tuned), "--base-model", str(base), "--out-path", str(theirs),
                  "--max-rank", str(args.rank), "--skip-undecomposable"])
        print(f"base: {params / 1e9:.2f}B params, bf16, 4 shards (largest {largest / 2**20:.0f} MiB); fine-tune = base + r=16 LoRA on 7 projections")
        print(f"  loratools extract --rank {args.rank}     {lt[0]:8.1f} s   peak RSS {lt[2] / 2**20:7.0f} MiB   {recovery(adapter, ours)}")
        print(f"  mergekit-extract-lora --max-rank {args.rank} {mk[0]:6.1f} s   peak RSS {mk[2] / 2**20:7.0f} MiB   {recovery(adapter, theirs)}")
        print("ratios:")
        print(f"  mergekit / loratools time  {mk[0] / lt[0]:6.2f}x")
        print(f"  mergekit / loratools RSS   {mk[2] / lt[2]:6.2f}x")
        print(f"  loratools RSS / largest shard {lt[2] / largest:6.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
