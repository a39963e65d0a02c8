"""Opening an adapter costs O(number of tensors), not O(bytes): `loratools info` on two
7B-shaped adapters with the same modules (32 layers x 7 projections, hidden 4096, intermediate
11008) but ranks 8 and 256 — 32x the bytes — against reading each file once.

    .venv/bin/python bench/info_bench.py [--workdir DIR]
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
SHAPE_7B = ["--hidden", "4096", "--intermediate", "11008", "--heads", "32", "--kv-heads", "32", "--layers", "32"]


def best_of(cmd: list[str], n: int = 5) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lt-info-", dir=args.workdir))
    try:
        rows = []
        for r in (8, 256):
            adapter = work / f"r{r}"
            subprocess.run([sys.executable, SYNTHETIC, "--adapter", str(adapter), "--r", str(r), *SHAPE_7B], check=True)
            size = (adapter / "adapter_model.safetensors").stat().st_size
            read = best_of(["cat", str(adapter / "adapter_model.safetensors")])
            info = best_of([LORATOOLS, "info", "--json", str(adapter)])
            rows.append((r, size, read, info))
        for r, size, read, info in rows:
            print(f"r={r:<4} {size / 2**20:7.0f} MiB   read once {read:6.3f} s   loratools info {info:6.3f} s")
        (r1, s1, _, i1), (r2, s2, _, i2) = rows
        print(f"bytes grow {s2 / s1:.0f}x; info time grows {i2 / i1:.2f}x (O(tensors): expect ~1x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
