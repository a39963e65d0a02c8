"""Exact SVD of a low-rank product without forming it.

ΔW = s·B·A with B (out, r) and A (r, in) has rank <= r. With B = Qb·Rb and Aᵀ = Qa·Ra (thin QR),
ΔW = Qb · (s·Rb·Raᵀ) · Qaᵀ, so the SVD of the small r×r core gives the singular values of ΔW
exactly, and its singular vectors mapped through Qb and Qa give ΔW's: O((out+in)·r²) work
instead of O(out·in·min(out, in)). A sum of such products is again one (stack the factors), which
is how combination by SVD uses this too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRankSVD:
    u: torch.Tensor | None  # (out, k) left singular vectors, float64; None if not asked for
    s: torch.Tensor  # (k,) singular values, descending, float64
    vh: torch.Tensor | None  # (k, in) right singular vectors, float64


def factored_svd(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0, vectors: bool = False) -> LowRankSVD:
    """SVD of scale·B·A (B: out×r, A: r×in). Computed in float64 throughout; k = min(out, in, r)."""
    b = b.to(torch.float64)
    a = a.to(torch.float64)
    qb, rb = torch.linalg.qr(b)  # qb (out, kb), rb (kb, r)
    qa, ra = torch.linalg.qr(a.T)  # qa (in, ka), ra (ka, r)
    core = scale * (rb @ ra.T)  # (kb, ka)
    if not vectors:
        return LowRankSVD(None, torch.linalg.svdvals(core), None)
    uc, s, vch = torch.linalg.svd(core, full_matrices=False)
    return LowRankSVD(qb @ uc, s, vch @ qa.T)


def padded(values: torch.Tensor, length: int) -> list[float]:
    """Singular values as a list of exactly `length` (a rank-r product has r values, the missing
    ones being zero when out or in is smaller than r)."""
    out = [float(x) for x in values[:length]]
    return out + [0.0] * (length - len(out))
