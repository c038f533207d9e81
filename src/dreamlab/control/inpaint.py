"""Inpainting as a denoiser wrapper (as ComfyUI's KSamplerX0Inpaint): the known region is re-imposed
on the input at the current noise level and on the x0 prediction, so any sampler inpaints, and at
sigma = 0 the known region equals the known image exactly."""

from __future__ import annotations

from torch import Tensor

from ..core.prediction import _b
from ..core.types import Cond, DenoiseFn


def inpaint(denoise: DenoiseFn, known: Tensor, mask: Tensor, noise: Tensor) -> DenoiseFn:
    """known: (B, C, h, w) clean state of the image; mask: (B, 1, h, w), 1 = regenerate, 0 = keep;
    noise: fixed standard normal noise shaped like ``known`` used to bring ``known`` to each sigma."""

    def wrapped(x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
        x = x * mask + (known + _b(sigma, x) * noise) * (1 - mask)
        return denoise(x, sigma, cond) * mask + known * (1 - mask)

    return wrapped
