"""Where diffusion happens: pixels or the latents of an autoencoder. Samplers never know which.

Images are (B, C, H, W) in [-1, 1]; C = 4 for RGBA (straight alpha), 3 for RGB.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Space(Protocol):
    factor: int  # image size / state size
    channels: int  # channels of the state
    image_channels: int

    def encode(self, images: Tensor) -> Tensor: ...

    def decode(self, state: Tensor) -> Tensor: ...


class PixelSpace:
    factor = 1

    def __init__(self, channels: int = 3):
        self.channels = self.image_channels = channels

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, state: Tensor) -> Tensor:
        return state


class VAESpace:
    """Latent diffusion (Rombach et al. 2022): z = (E(x) - shift) * scale, x = D(z / scale + shift).

    ``scale`` makes latents roughly unit-variance (0.18215 for Stable Diffusion 1.x). Encoding uses the
    mean of the posterior, so it is deterministic.
    """

    def __init__(self, vae, scale: float | None = None, shift: float | None = None):
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.scale = float(scale if scale is not None else getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift = float(shift if shift is not None else getattr(cfg, "shift_factor", 0.0) or 0.0)
        self.channels = int(cfg.latent_channels)
        self.image_channels = int(cfg.in_channels)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        z = self.vae.encode(images.to(self.dtype)).latent_dist.mean
        return ((z - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, state: Tensor) -> Tensor:
        return self.vae.decode((state / self.scale + self.shift).to(self.dtype)).sample.float()
