"""DiffEdit masks (Couairon et al. 2022): where an edit should happen, from where the model's noise
predictions under the source and the target prompt disagree.

The image's latents are noised to about half the schedule with several noises; at each, the
difference of the two predictions is averaged over channels, the differences averaged over the noises,
clamped at three times their mean and normalised (as diffusers' DiffEdit), smoothed with a 3x3 box and
thresholded. The edit then runs through the inpainting wrapper inside that mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.types import Cond, DenoiseFn


def diffedit_mask(denoise: DenoiseFn, latents: Tensor, source: Cond, target: Cond, sigma: float,
                  noises: list[Tensor], threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """(binary mask (1, 1, h, w), the soft map before thresholding). ``denoise`` should be guided as the
    edit will be; ``noises``: standard normal tensors shaped like ``latents``."""
    diffs = []
    s = torch.full((latents.shape[0],), sigma, dtype=latents.dtype, device=latents.device)
    for z in noises:
        x = latents + sigma * z.to(latents)
        eps_src = (x - denoise(x, s, source)) / sigma
        eps_tgt = (x - denoise(x, s, target)) / sigma
        diffs.append((eps_tgt - eps_src).abs().mean(dim=1, keepdim=True))
    soft = torch.stack(diffs).mean(0)
    clamp = soft.mean() * 3
    soft = soft.clamp(0, float(clamp)) / clamp.clamp_min(1e-12)
    soft = F.avg_pool2d(soft, 3, 1, padding=1, count_include_pad=False)
    return (soft > threshold).float(), soft
