"""Image latents concatenated to the network's input: a model wrapper (super-resolution's low-res input).

Every row of a call gets the same latents, the unconditional rows too: classifier-free guidance drops
only the text, never the image (Ho et al. 2021, cascaded diffusion). An input the guider varies per row
(InstructPix2Pix's image, dropped in one row) rides in ``Cond.concat`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..core.noise import NoiseSource
from ..core.objectives import q_sample
from ..core.schedules import DiscreteSchedule
from ..core.types import Cond, ModelCall

AUGMENT_STREAM = 1 << 41  # the noise added to a super-resolution model's low-res input


@dataclass(frozen=True)
class ConcatLatents:
    """Model wrapper: ``latents`` (1, C, h, w) concatenated to every row, with their noise level (a
    timestep, reaching the UNet as its class label) if they were noised."""

    latents: Tensor
    noise_level: float | None = None

    def __call__(self, call: ModelCall) -> ModelCall:
        rows = call.x_t.shape[0]
        level = None if self.noise_level is None else torch.full((rows,), float(self.noise_level), device=call.x_t.device)
        cond = call.cond if call.cond is not None else Cond()
        return replace(call, cond=replace(cond, concat=self.latents.expand(rows, *self.latents.shape[1:]), noise_level=level))


@dataclass(frozen=True)
class LowResInput:
    """A super-resolution stage's input: the latents of each image's enlarged low-res version (one for
    every image, or one shared), noised to ``level`` with noise from the image's own seed (conditioning
    augmentation, so the result is reproducible)."""

    latents: list[Tensor]
    level: int
    schedule: DiscreteSchedule

    def model_wrapper(self, i: int, noise: NoiseSource, sigmas: Tensor) -> ConcatLatents:
        low = self.latents[i if len(self.latents) > 1 else 0]
        t = torch.full((1,), self.level, dtype=torch.long, device=low.device)
        return ConcatLatents(q_sample(low, t, noise.draw(AUGMENT_STREAM), self.schedule), float(self.level))
