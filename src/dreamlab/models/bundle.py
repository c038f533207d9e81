"""A loaded model: everything ``generate`` needs, independent of where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.prediction import Denoiser, Prediction
from ..core.schedules import DiscreteSchedule
from ..core.types import Cond
from .space import Space
from .text import TextEncoder
from .unet import UNetModelFn


@dataclass(frozen=True)
class SuperResolution:
    """What makes a model a super-resolution stage: it denoises images of ``sample_size`` conditioned on
    a low-resolution image (``from_size`` by default), whose latents it sees concatenated to its input
    after noise of level ``noise_level`` (a training timestep) is added: conditioning augmentation."""

    from_size: int
    noise_level: int


@dataclass(eq=False)
class ModelBundle:
    unet: nn.Module  # a diffusers UNet2DConditionModel
    text_encoder: TextEncoder | None
    space: Space
    schedule: DiscreteSchedule
    prediction: Prediction
    sample_size: int  # default image height and width, pixels
    use_mask: bool = False  # pass the text attention mask to cross-attention
    name: str = "model"
    source: str = ""  # folder it was loaded from
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256, for manifests
    sr: SuperResolution | None = None  # set for a super-resolution stage
    upscaler: "ModelBundle | None" = None  # a cascade: this base model's images are enlarged by this SR stage

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def denoiser(self) -> Denoiser:
        return Denoiser(
            UNetModelFn(self.unet, use_mask=self.use_mask), self.schedule, self.prediction, model_dtype=self.dtype
        )

    def encode_prompts(self, prompts: list[str]) -> Cond | None:
        if self.text_encoder is None:
            return None
        cond = self.text_encoder.encode(prompts)
        return Cond(
            tokens=cond.tokens.to(self.device) if cond.tokens is not None else None,
            mask=cond.mask.to(self.device) if cond.mask is not None else None,
            pooled=cond.pooled.to(self.device) if cond.pooled is not None else None,
        )
