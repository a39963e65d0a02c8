"""Opening an adapter costs O(number of tensors), not O(bytes): `loratools info` on two
7B-shaped adapters with the same modules (32 layers x 7 projections, hidden 4096, intermediate
11008) but ranks 8 and 256 — 32x the bytes — against reading each file once.

    .venv/bin/python bench/info_bench.py [--workdir DIR]
"""

from __future__ import annotations

from common import LORATOOLS, best_of, make_7b_adapter, scratch


def main() -> None:
    with scratch(__doc__.splitlines()[0], "lt-info-") as work:
        rows = []
        for r in (8, 256):
            adapter = make_7b_adapter(work / f"r{r}", r)
            size = (adapter / "adapter_model.safetensors").stat().st_size
            read = best_of(["cat", str(adapter / "adapter_model.safetensors")])
            info = best_of([LORATOOLS, "info", "--json", str(adapter)])
            rows.append((r, size, read, info))
        for r, size, read, info in rows:
            print(f"r={r:<4} {size / 2**20:7.0f} MiB   read once {read:6.3f} s   loratools info {info:6.3f} s")
        (r1, s1, _, i1), (r2, s2, _, i2) = rows
        print(f"bytes grow {s2 / s1:.0f}x; info time grows {i2 / i1:.2f}x (O(tensors): expect ~1x)")


if __name__ == "__main__":
    main()
