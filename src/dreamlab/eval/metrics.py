"""Distribution distances between feature sets (N, D).

FID (Heusel et al. 2017): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), computed in float64 with
Tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), which is symmetric PSD.
KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3, averaged over subsets.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _sqrtm_psd(m: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def _check(a: Tensor, b: Tensor, what: str) -> None:
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"{what} needs at least 2 feature vectors in each set, got {len(a)} and {len(b)}")


def fid(a: Tensor, b: Tensor) -> float:
    _check(a, b, "FID")
    a, b = a.double(), b.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    r1 = _sqrtm_psd(s1)
    covmean_trace = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * covmean_trace)


def kid(a: Tensor, b: Tensor, subsets: int = 50, subset_size: int = 500, seed: int = 0) -> tuple[float, float]:
    """Mean and std of the unbiased MMD^2 over random subsets."""
    _check(a, b, "KID")
    a, b = a.double(), b.double()
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:m]]
        y = b[torch.randperm(len(b), generator=g)[:m]]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = (kxx.sum() - kxx.diag().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1)) - 2 * kxy.mean()
        vals.append(float(mmd))
    t = torch.tensor(vals)
    return float(t.mean()), float(t.std()) if len(vals) > 1 else 0.0


def topk_accuracy(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    top = logits.topk(max(ks), dim=1).indices
    hit = top == labels[:, None]
    return {k: float(hit[:, :k].any(dim=1).float().mean()) for k in ks}
