"""Regional prompts: each region of the canvas (a box or a mask) gets its own prompt, beside a global one.

A guider: the rows of one forward are the unconditional, the global prompt and every region's prompt;
the conditional estimate is, per latent pixel, the regions' estimates averaged where they cover it and
the global one where none does (MultiDiffusion's region-based variant, Bar-Tal et al. 2023, and the
"latent couple" of regional prompting), then classifier-free guidance as usual. Regions that cover
nothing of a window are not run there; where the regions cover everything the global row is not run,
so one region over the whole canvas is that region's prompt alone, bit for bit."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.types import Cond, Role, Row


def box_mask(box: tuple[int, int, int, int], width: int, height: int) -> Tensor:
    """(1, 1, H, W) 1 inside the pixel box (x0, y0, x1, y1)."""
    m = torch.zeros(1, 1, height, width)
    x0, y0, x1, y1 = box
    m[..., y0:y1, x0:x1] = 1.0
    return m


def to_latent(mask: Tensor, factor: int) -> Tensor:
    """A pixel mask (1, 1, H, W) at the latent grid (area average, then the share covered)."""
    return F.avg_pool2d(mask, factor) if factor > 1 else mask


@dataclass(eq=False)
class RegionalCFG:
    """``conds``: [global, region 1, ...] one row each; ``masks``: (k, 1, h, w) the regions at the latent
    grid of the cell this guider serves (cropped for a window)."""

    uncond: Cond
    conds: list[Cond]
    masks: Tensor
    scale: float
    _rows: list = field(default_factory=list)

    def __post_init__(self) -> None:
        present = [i for i in range(self.masks.shape[0]) if float(self.masks[i].sum()) > 0]
        self.used = present
        weight = self.masks[present].sum(0, keepdim=True) if present else torch.zeros_like(self.masks[:1, :1])
        self.covered = weight.clamp(max=1.0)
        self.weight = weight.clamp(min=1.0)
        self.global_row = not bool((self.covered >= 1).all()) or not present

    def prepare(self, x: Tensor, sigma: Tensor, cond: Cond | None):
        if not self._rows:
            rows = [self.uncond] + ([self.conds[0]] if self.global_row else []) + [self.conds[1 + i] for i in self.used]
            roles = (Row(Role.UNCOND),) + tuple(Row(Role.COND, part=k) for k in range(len(rows) - 1))
            self._rows.append(Cond.cat([replace(r, roles=None) for r in rows]).with_roles(roles))
        n = self._rows[0].rows
        return torch.cat([x] * n), torch.cat([sigma] * n), self._rows[0]

    def combine(self, x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
        parts = list(x0.chunk(self._rows[0].rows))
        x0_u = parts.pop(0)
        x0_g = parts.pop(0) if self.global_row else None
        m = self.masks[self.used].to(x0_u)
        local = sum(m[k:k + 1] * p for k, p in enumerate(parts)) / self.weight.to(x0_u) if parts else 0
        x0_c = local * self.covered.to(x0_u) + (x0_g * (1 - self.covered.to(x0_u)) if x0_g is not None else 0)
        delta = sum(w * (x0_i - x0_u) for w, x0_i in zip((1.0,), (x0_c,)))  # the very expression CFG evaluates
        return x0_u + self.scale * delta
