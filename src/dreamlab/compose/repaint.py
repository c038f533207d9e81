"""RePaint resampling (Lugmayr et al. 2022, Algorithm 1 with jump length 1): after each step from sigma
to sigma_next, the state is noised back to sigma and the step is taken again, ``jumps`` times, so the
generated part sees the known part (re-imposed by the inpainting wrapper at every call) once more at
the same noise level and can harmonise with it. A sampler state hook: each resampling is one denoiser
call and a deterministic DDIM step (eq. 12, eta = 0), whatever the sampler; a multistep sampler keeps
its own history (its last estimate is the one before resampling).

In the variance-exploding form x = x0 + sigma * eps, q(x_sigma | x_sigma_next) adds fresh noise of
variance sigma^2 - sigma_next^2; the noise of step i's jump u is ``noise.draw(RESAMPLE_STREAM + i *
MAX_JUMPS + u)``, so a resampled image replays bit for bit."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.noise import NoiseSource
from ..core.types import DenoiseFn, StepInfo

RESAMPLE_STREAM = 1 << 45
MAX_JUMPS = 16


@dataclass(eq=False)
class RePaint:
    denoise: DenoiseFn  # the inpainting denoiser: it re-imposes the known region at every call
    noise: NoiseSource  # the image's own
    jumps: int  # resamplings per step (RePaint's r - 1)

    def __call__(self, info: StepInfo) -> Tensor | None:
        if self.jumps <= 0 or info.sigma_next <= 0:
            return None  # the last step lands on the data: nothing to resample
        sigma, sigma_next = info.sigma, info.sigma_next
        x = info.x
        up = math.sqrt(sigma**2 - sigma_next**2)
        s = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        for u in range(self.jumps):
            x = x + up * self.noise.draw(RESAMPLE_STREAM + info.i * MAX_JUMPS + u).to(x)  # back to sigma
            x0 = self.denoise(x, s, None)
            x = x0 + (x - x0) * (sigma_next / sigma)  # and down again
        return x
