"""Guidance: wrappers that take a denoiser and return a denoiser.

With x = x0 + sigma * eps, the score is grad log p_sigma(x) = (x0(x) - x) / sigma^2 (Tweedie), so any
change of the score by delta becomes a change of x0 by sigma^2 * delta. Guidance on x0 is the same as
guidance on eps or v: at a fixed x and sigma, each is an affine function of the others.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .guiders import CFG, guide
from .prediction import _b
from .types import Cond, DenoiseFn


def classifier_free(denoise: DenoiseFn, uncond: Cond | None, scale: float, *, rescale: float = 0.0,
                    weights: Sequence[float] | None = None) -> DenoiseFn:
    """Classifier-free guidance (Ho & Salimans 2022), x0 = x0_u + scale * (x0_c - x0_u), composed over
    the parts of ``weights`` if given: :func:`~dreamlab.core.guiders.guide` with a
    :class:`~dreamlab.core.guiders.CFG` guider (see there). At scale 1 with no rescale and no weights the
    denoiser is returned as it is: no unconditional row is run."""
    if scale == 1.0 and rescale == 0.0 and weights is None:
        return denoise
    guider = CFG(uncond, scale, (1.0,) if weights is None else weights, rescale, _composed=weights is not None)
    return guide(denoise, guider)


def dynamic_threshold(denoise: DenoiseFn, percentile: float = 0.995, max_value: float | None = None) -> DenoiseFn:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample, s = the percentile of
    |x0|, at least 1 (at most ``max_value`` if given); x0 <- clip(x0, -s, s) / s. Keeps x0 in [-1, 1]
    while letting high guidance scales saturate less than static clipping."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must be within (0, 1], got {percentile}")

    def thresholded(x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
        x0 = denoise(x, sigma, cond)
        flat = x0.reshape(x0.shape[0], -1).abs().float()
        s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0, max=max_value)
        s = s.reshape(-1, *(1,) * (x0.ndim - 1)).to(x0.dtype)
        return x0.clamp(-s, s) / s

    return thresholded


# log p(y | x, sigma) for each sample: (x, sigma, cond) -> (B,)
LogLikelihood = Callable[[Tensor, Tensor, Cond | None], Tensor]


def gradient_guidance(denoise: DenoiseFn, log_likelihood: LogLikelihood, scale: float = 1.0) -> DenoiseFn:
    """Classifier guidance (Dhariwal & Nichol 2021) from Bayes' rule:
        grad log p(x | y) = grad log p(x) + scale * grad log p(y | x).
    The second term, a gradient through any differentiable ``log_likelihood`` of the noisy x, is added
    to the score, i.e. sigma^2 * scale * grad to x0. With scale=1 and the exact noisy likelihood the
    sampler draws from the exact posterior p(x0 | y)."""

    def guided(x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
        x0 = denoise(x, sigma, cond)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(log_likelihood(xg, sigma, cond).sum(), xg)
        return x0 + _b(sigma, x) ** 2 * scale * grad

    return guided
