"""ILVR (Choi et al. 2021): guide a sample toward a reference's low frequencies. After every step the
state's low-pass part (down- and up-sampling by N) is replaced by that of the reference noised to the
next sigma: x <- x - low(x) + low(ref + sigma_next * eps). A sampler state hook, in latent space (N is
given in pixels; the latents are N / f times smaller). Larger N keeps less of the reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..core.types import StepInfo


def low_pass(x: Tensor, factor: int) -> Tensor:
    if factor <= 1:
        return x
    small = F.avg_pool2d(x, factor)
    return F.interpolate(small, scale_factor=factor, mode="bilinear", align_corners=False)


@dataclass(eq=False)
class ILVR:
    reference: Tensor  # (1, C, h, w) clean latents of the reference
    factor: int  # in latent pixels
    noise: Tensor  # fixed standard normal noise shaped like the reference

    def __call__(self, info: StepInfo) -> Tensor:
        target = self.reference.to(info.x) + info.sigma_next * self.noise.to(info.x)
        return info.x - low_pass(info.x, self.factor) + low_pass(target, self.factor)
