"""Pasting known pixels back over a decoded image with a feathered band (A1111's "mask blur", kept on
the known side): the generated area stays as decoded, the known core is the source exactly, and over
the ``band`` pixels of the known region next to the generated area the two are blended linearly.

Why: the known latents decode to the known pixels only up to the autoencoder's error, and that error
is largest at the border of the known region (its encoder saw the canvas beyond it). The generated
pixels next to the seam continue the *decoded* known pixels, so a hard paste of the exact source
leaves a one-pixel step of autoencoder error along the seam; a band hides it, and since both sides of
the blend are the known image (decoded or exact), the band is within the autoencoder's error too."""

from __future__ import annotations

import torch
from torch import Tensor


def feather_weight(inside: Tensor, band: int) -> Tensor:
    """How much of the decoded image a pixel takes: 1 in the generated area (``inside`` = 0), falling
    linearly over the first ``band`` pixels inside the known region (``inside`` = 1, 2, ...: how deep a
    pixel lies from the generated area) to 0 beyond them: band / (band + 1) at depth 1, 0 at depth band + 1."""
    if band <= 0:
        return (inside == 0).to(torch.float32)
    return (1 - inside / (band + 1)).clamp(0, 1)


def paste(decoded: Tensor, source: Tensor, weight: Tensor) -> Tensor:
    """decoded where weight is 1, the source exactly where it is 0, a linear blend between."""
    w = weight.to(decoded)
    return decoded * w + source.to(decoded) * (1 - w)
