"""A strength per pixel (differential strength; the per-layer noise levels of Collage Diffusion): the
sampler runs from the highest strength's sigma, and a pixel is re-imposed from the known image (noised
to the current sigma, on the state; clean, on the x0 estimate) until the sigma falls to its own
strength's. Strength 0 keeps a pixel's latents exactly; the highest strength leaves it free throughout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.prediction import _b
from ..core.schedules import truncate
from ..core.types import Cond, DenoiseFn


@dataclass(eq=False)
class StrengthMap:
    denoise: DenoiseFn
    known: Tensor  # (1, C, h, w) clean latents
    strength: Tensor  # (1, 1, h, w) in [0, 1]
    full: Tensor  # the whole sigma grid strengths index into
    noise: Tensor  # fixed standard normal noise shaped like ``known``

    def __post_init__(self) -> None:
        # the sigma at which each pixel becomes free: the start of its truncated schedule (0: never)
        values = self.strength.flatten().tolist()
        start = {s: (float(truncate(self.full, s)[0]) if s > 0 else 0.0) for s in set(values)}
        self.threshold = torch.tensor([start[s] for s in values], dtype=self.known.dtype,
                                      device=self.known.device).reshape(self.strength.shape)

    def wrapped(self) -> DenoiseFn:
        def denoise(x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
            free = (_b(sigma, x) <= self.threshold * (1 + 1e-6)).to(x.dtype)
            x = x * free + (self.known + _b(sigma, x) * self.noise) * (1 - free)
            return self.denoise(x, sigma, cond) * free + self.known * (1 - free)

        return denoise
