"""Exact SVD of a low-rank product without forming it.

ΔW = s·B·A with B (out, r) and A (r, in) has rank <= r. With B = Qb·Rb and Aᵀ = Qa·Ra (thin QR),
ΔW = Qb · (s·Rb·Raᵀ) · Qaᵀ, so the SVD of the small r×r core gives the singular values of ΔW
exactly, and its singular vectors mapped through Qb and Qa give ΔW's: O((out+in)·r²) work
instead of O(out·in·min(out, in)). A sum of such products is again one (stack the factors), which
is how combination by SVD uses this too.

When only singular values are wanted, the triangular factors are replaced by square roots of
the Gram matrices (BᵀB = RbᵀRb with Rb = √Λ·Vᵀ from its eigendecomposition): same core singular
values, a GEMM instead of a QR, about 2.5x faster, and still float64 throughout.
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
    """SVD of scale·B·A (B: out×r, A: r×in), in float64; k = min(out, in, r) values (Gram path:
    r values, the extra ones zero)."""
    b = b.to(torch.float64)
    a = a.to(torch.float64)
    if not vectors:
        core = scale * (_gram_root(b) @ _gram_root(a.T).T)
        return LowRankSVD(None, torch.linalg.svdvals(core), None)
    qb, rb = torch.linalg.qr(b)  # qb (out, kb), rb (kb, r)
    qa, ra = torch.linalg.qr(a.T)  # qa (in, ka), ra (ka, r)
    uc, s, vch = torch.linalg.svd(scale * (rb @ ra.T), full_matrices=False)
    return LowRankSVD(qb @ uc, s, vch @ qa.T)


def _gram_root(x: torch.Tensor) -> torch.Tensor:
    """R (r×r) with RᵀR = xᵀx, for x (n×r); fine when x is rank-deficient."""
    eigenvalues, vectors = torch.linalg.eigh(x.T @ x)
    return eigenvalues.clamp_min(0).sqrt().unsqueeze(1) * vectors.T


def balanced_factors(svd: LowRankSVD, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of the rank-k truncation U_k·S_k·Vh_k, split evenly: B' = U·√S, A' = √S·Vh."""
    root = svd.s[:k].sqrt()
    return root.unsqueeze(1) * svd.vh[:k], svd.u[:, :k] * root


def padded(values: torch.Tensor, length: int) -> list[float]:
    """Singular values as a list of exactly `length` (a rank-r product has r values, the missing
    ones being zero when out or in is smaller than r)."""
    out = [float(x) for x in values[:length]]
    return out + [0.0] * (length - len(out))
