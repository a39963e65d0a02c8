"""A merged row block into bfloat16 in one pass: the C extension `_fused`, where it was built.

Why C: numpy needs six passes over a float32 block to widen a bfloat16 base, add ΔW, check that
the sum rounds to a finite bfloat16 and round it (ties to even) — two thirds of a merge's CPU,
which is what kept a merge far from copy speed. No library does it in one pass: torch's cast
does the rounding alone but costs 1.5 s to import, ml_dtypes' cast was measured slower than
numpy's bit arithmetic. `_fused.c` reads each element once and writes it once, with the same
float32 additions and the same integer rounding on the bits, so its output is bit for bit the
numpy path's (tests/test_fused.py).

Three sources of the base's rows, each into bfloat16 bits with ΔW (float32, or None: rows no
product touches) added first, each returning whether every sum is below `limit` in magnitude:

- add_bf16: a stored bfloat16 weight (its bits);
- add_f32: float32 values (round_base: rounded to bfloat16 precision first);
- add_4bit: a bitsandbytes 4-bit weight's elements first.., decoded as dequant.BnbRows does.

Built as an optional extension: without a C compiler, or with LORATOOLS_NO_C set (to compare),
`native` is None and the merge kernel takes the numpy path.
"""

from __future__ import annotations

import os

try:
    from . import _fused as native
except ImportError:  # built without a C compiler: kernel_numpy's numpy path, the same bits
    native = None

if os.environ.get("LORATOOLS_NO_C"):
    native = None
