"""Benchmark `loratools validate`: a 7B-shaped r=64 adapter against reading its bytes once, and a
folder of 100 small adapters in one process.

    .venv/bin/python bench/validate_bench.py [--workdir DIR]
"""

from __future__ import annotations

import shutil
import sys

from common import FIXTURES, LORATOOLS, best_of, make_7b_adapter, scratch


def main() -> None:
    with scratch(__doc__.splitlines()[0], "lt-validate-") as work:
        big = make_7b_adapter(work / "big", 64)
        weights = big / "adapter_model.safetensors"
        read_s = best_of([sys.executable, "-c", f"open({str(weights)!r}, 'rb').read()"], n=3)
        validate_s = best_of([LORATOOLS, "validate", str(big)], n=3)
        folder = work / "many"
        sources = sorted(p for p in FIXTURES.iterdir() if (p / "adapter_model.safetensors").exists())
        for i in range(100):
            shutil.copytree(sources[i % len(sources)], folder / f"a{i:03d}")
        many_s = best_of([LORATOOLS, "validate", *map(str, sorted(folder.iterdir()))], n=3)
        print(f"7B-shaped r=64 adapter ({weights.stat().st_size / 2**20:.0f} MiB, 224 modules):")
        print(f"  python: read its bytes once        {read_s:6.2f} s")
        print(f"  loratools validate                 {validate_s:6.2f} s")
        print(f"  validate / read                    {validate_s / read_s:6.2f}x  (target <= 2x)")
        print(f"100 small adapters in one process: {many_s:.2f} s, {many_s / 100 * 1000:.0f} ms per adapter (target << 1 s)")


if __name__ == "__main__":
    main()
