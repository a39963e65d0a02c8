"""What the benchmark scripts share: paths, the 7B adapter shape, a scratch directory, timing."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
SYNTHETIC = str(HERE / "synthetic.py")
LORATOOLS = str(Path(sys.executable).with_name("loratools"))
FIXTURES = HERE.parent / "fixtures" / "adapters"
# LLaMA-2-7B: 32 layers, hidden 4096, intermediate 11008, no grouped-query attention
SHAPE_7B = ["--hidden", "4096", "--intermediate", "11008", "--heads", "32", "--kv-heads", "32", "--layers", "32"]


def make_7b_adapter(path: Path, r: int, seed: int = 1) -> Path:
    """A synthetic 7B-shaped adapter on all seven projections, built in a child process."""
    subprocess.run([sys.executable, SYNTHETIC, "--adapter", str(path), "--r", str(r), "--seed", str(seed), *SHAPE_7B], check=True)
    return path


@contextmanager
def scratch(description: str, prefix: str) -> Iterator[Path]:
    """Parse the common --workdir option and yield a scratch directory removed afterwards."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--workdir", type=Path, help="where to put the (large) temporary files")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=args.workdir))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def best_of(cmd: list[str], n: int = 5) -> float:
    """The fastest of n runs of a command (seconds): the least disturbed by the machine."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)
