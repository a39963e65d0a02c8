"""Benchmark `loratools merge` against the I/O floor (cp -r) and the PEFT pipeline, same run.

    .venv/bin/python bench/merge_bench.py [--layers 22] [--small-layers 11] [--workdir DIR] [--skip-peft]

Builds a synthetic LLaMA-shaped bf16 base (hidden 2048, intermediate 5632, 32000 vocab: 22
layers is ~1.1B parameters) in 4 shards and an r=16 adapter on all seven projections, then times
each contender in its own process (wall time, peak RSS from wait4). Prints ratios: absolute
times drift on shared machines, ratios measured in one run do not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYNTHETIC = str(Path(__file__).resolve().with_name("synthetic.py"))
LORATOOLS = str(Path(sys.executable).with_name("loratools"))

PEFT_PIPELINE = """
import sys, torch, transformers, peft
base, adapter, out = sys.argv[1:]
model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = peft.PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out, max_shard_size="600MB")
"""


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return seconds, usage.ru_maxrss * 1024


def warm(path: Path) -> None:
    """Read every file once so all contenders start from the same (warm) page cache."""
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def build(work: Path, layers: int) -> tuple[Path, Path, int, int]:
    """Base (hidden 2048, intermediate 5632, vocab 32000, 4 shards) + r=16 adapter, built in a
    child process so this one never imports torch (see synthetic.main)."""
    base, adapter = work / f"base-{layers}", work / f"adapter-{layers}"
    subprocess.run([sys.executable, SYNTHETIC, "--base", str(base), "--adapter", str(adapter), "--layers", str(layers)], check=True)
    params = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2  # bf16
    largest = max(p.stat().st_size for p in base.glob("*.safetensors"))
    return base, adapter, params, largest


def median_run(cmd: list[str], out: Path, repeat: int) -> tuple[float, int]:
    results = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        results.append(run(cmd))
    shutil.rmtree(out, ignore_errors=True)
    results.sort()
    return results[len(results) // 2][0], max(r[1] for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--small-layers", type=int, default=11)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--skip-peft", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lt-bench-", dir=args.workdir))
    try:
        rows = []
        for layers in (args.small_layers, args.layers):
            base, adapter, params, largest = build(work, layers)
            warm(base)
            out = work / "out"
            cp_s, _ = median_run(["cp", "-r", str(base), str(out)], out, args.repeat)
            lt_s, lt_rss = median_run([LORATOOLS, "merge", str(base), str(adapter), str(out), "--quiet"], out, args.repeat)
            rows.append((layers, params, largest, cp_s, lt_s, lt_rss))
        layers, params, largest, cp_s, lt_s, lt_rss = rows[-1]
        print(f"base: {params / 1e9:.2f}B params, bf16, 4 shards (largest {largest / 2**20:.0f} MiB); adapter r=16 on 7 projections")
        print(f"  cp -r (I/O floor)        {cp_s:7.2f} s")
        print(f"  loratools merge          {lt_s:7.2f} s   peak RSS {lt_rss / 2**20:6.0f} MiB")
        if not args.skip_peft:
            out = work / "out"
            peft_s, peft_rss = median_run([sys.executable, "-c", PEFT_PIPELINE, str(work / f"base-{layers}"), str(work / f"adapter-{layers}"), str(out)], out, 1)
            print(f"  PEFT pipeline            {peft_s:7.2f} s   peak RSS {peft_rss / 2**20:6.0f} MiB")
        print("ratios:")
        print(f"  loratools / cp           {lt_s / cp_s:5.2f}x   (target <= 2x)")
        if not args.skip_peft:
            print(f"  PEFT / loratools         {peft_s / lt_s:5.1f}x   (target >= 5x)")
        print(f"  peak RSS - largest shard {(lt_rss - largest) / 2**20:+6.0f} MiB (target <= +512 MiB)")
        print("peak RSS as the model grows (should stay flat):")
        for layers, params, largest, cp_s, lt_s, lt_rss in rows:
            print(f"  {params / 1e9:5.2f}B params, largest shard {largest / 2**20:5.0f} MiB: loratools {lt_rss / 2**20:6.0f} MiB, "
                  f"{lt_s / cp_s:4.2f}x cp")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
