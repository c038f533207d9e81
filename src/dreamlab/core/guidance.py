"""Guidance: wrappers that take a denoiser and return a denoiser.

With x = x0 + sigma * eps, the score is grad log p_sigma(x) = (x0(x) - x) / sigma^2 (Tweedie), so any
change of the score by delta becomes a change of x0 by sigma^2 * delta. Guidance on x0 is the same as
guidance on eps or v: at a fixed x and sigma, each is an affine function of the others.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .prediction import _b
from .types import Cond, DenoiseFn


def classifier_free(denoise: DenoiseFn, uncond: Cond | None, scale: float, *, rescale: float = 0.0,
                    weights: Sequence[float] | None = None) -> DenoiseFn:
    """Classifier-free guidance (Ho & Salimans 2022): x0 = x0_u + scale * (x0_c - x0_u).

    ``uncond`` is the conditioning of the empty prompt, or of the negative prompt. Cond and uncond run
    in one batched forward. ``rescale`` (phi in Lin et al. 2023, eq. 15-16) pulls the std of the guided
    eps back towards that of the conditional eps, as diffusers' ``guidance_rescale``.

    ``weights`` (w_1..w_k) composes k conditionings (Liu et al. 2022, "Compositional Visual Generation with
    Composable Diffusion Models", eq. 9-10): x0 = x0_u + scale * sum_i w_i (x0_i - x0_u); a negative
    weight steers away from its part. The cond given at each call then holds the k parts stacked along
    the batch, part-major (rows i*B..(i+1)*B-1 are part i for a batch of B), and all k + 1 predictions
    run in one batched forward. The rescale's reference is the composed prediction at scale 1.
    """
    if scale == 1.0 and rescale == 0.0 and weights is None:
        return denoise
    ws = (1.0,) if weights is None else tuple(weights)  # plain CFG: one part of weight 1
    if not ws:
        raise ValueError("weights must name at least one conditioning")
    n = len(ws) + 1  # the uncond and the parts, in one forward
    if uncond is None:
        raise ValueError("classifier-free guidance needs an unconditional conditioning")
    # (batch size, uncond broadcast to it) and (cond, cat([uncond, cond])): both repeat every step.
    broadcast: dict[int, Cond] = {}
    batched: list[tuple[Cond, Cond]] = []

    def uncond_for(batch: int) -> Cond:
        if batch not in broadcast:
            u = uncond
            if u.tokens is not None and u.tokens.shape[0] == 1 and batch > 1:
                u = Cond.cat([u] * batch)
            broadcast[batch] = u
        return broadcast[batch]

    def guided(x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
        if scale == 0.0:
            return denoise(x, sigma, uncond_for(x.shape[0]))
        if cond is None:
            raise ValueError("classifier-free guidance needs a conditioning")
        if not batched or batched[0][0] is not cond:
            batched[:] = [(cond, Cond.cat([uncond_for(x.shape[0]), cond]))]
        both = batched[0][1]
        rows = both.tokens.shape[0] if both.tokens is not None else None
        if weights is not None and rows is not None and rows != n * x.shape[0]:
            raise ValueError(f"composed guidance of {n - 1} parts needs {(n - 1) * x.shape[0]} conditioning rows "
                             f"for a batch of {x.shape[0]}, got {rows - x.shape[0]}")
        x0_u, *x0_parts = denoise(torch.cat([x] * n), torch.cat([sigma] * n), both).chunk(n)
        delta = sum(w * (x0_i - x0_u) for w, x0_i in zip(ws, x0_parts))  # exactly x0_c - x0_u for one part
        x0 = x0_u + scale * delta
        x0_c = x0_parts[0] if weights is None else x0_u + delta  # the rescale's reference: guidance at scale 1
        if rescale > 0:
            s = _b(sigma, x)
            eps_c, eps_cfg = (x - x0_c) / s, (x - x0) / s
            dims = tuple(range(1, x.ndim))
            ratio = eps_c.std(dim=dims, keepdim=True) / eps_cfg.std(dim=dims, keepdim=True)
            eps = eps_cfg * (rescale * ratio + (1 - rescale))
            x0 = x - s * eps
        return x0

    return guided


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
