"""Benchmark `loratools validate`: a 7B-shaped r=64 adapter against reading its bytes once, and a
folder of 100 small adapters in one process.

    .venv/bin/python bench/validate_bench.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYNTHETIC = str(Path(__file__).resolve().with_name("synthetic.py"))
LORATOOLS = str(Path(sys.executable).with_name("loratools"))
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "adapters"
SHAPE_7B = ["--hidden", "4096", "--intermediate", "11008", "--heads", "32", "--kv-heads", "32", "--layers", "32"]


def best_of(cmd: list[str], n: int = 3) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lt-validate-", dir=args.workdir))
    try:
        big = work / "big"
        subprocess.run([sys.executable, SYNTHETIC, "--adapter", str(big), "--r", "64", *SHAPE_7B], check=True)
        weights = big / "adapter_model.safetensors"
        read_s = best_of([sys.executable, "-c", f"open({str(weights)!r}, 'rb').read()"])
        validate_s = best_of([LORATOOLS, "validate", str(big)])
        folder = work / "many"
        sources = sorted(p for p in FIXTURES.iterdir() if (p / "adapter_model.safetensors").exists())
        for i in range(100):
            shutil.copytree(sources[i % len(sources)], folder / f"a{i:03d}")
        many_s = best_of([LORATOOLS, "validate", *map(str, sorted(folder.iterdir()))])
        print(f"7B-shaped r=64 adapter ({weights.stat().st_size / 2**20:.0f} MiB, 224 modules):")
        print(f"  python: read its bytes once        {read_s:6.2f} s")
        print(f"  loratools validate                 {validate_s:6.2f} s")
        print(f"  validate / read                    {validate_s / read_s:6.2f}x  (target <= 2x)")
        print(f"100 small adapters in one process: {many_s:.2f} s, {many_s / 100 * 1000:.0f} ms per adapter (target << 1 s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
