"""The canvas as cells: each cell is a window of the latent canvas seen through a view, denoised with
its own guided denoiser; every step the cells' x0 estimates are mapped back and averaged where they
overlap. Plain generation is one cell (the whole canvas, identity view): bit for bit the same."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..core.types import Cond, DenoiseFn
from .views import VIEWS, View
from .windows import Tile


@dataclass(frozen=True)
class Cell:
    tile: Tile | None  # window of the canvas (None: all of it)
    view: View = VIEWS["identity"]
    prompt: int = 0  # which prompt this cell is guided by (an illusion's view prompts)


def average(cells: list[Cell], make: Callable[[Cell], DenoiseFn]) -> DenoiseFn:
    """One denoiser over the canvas: each cell's estimate, mapped back through its view, averaged."""
    denoisers = [make(c) for c in cells]

    def denoise(x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
        total = torch.zeros_like(x)
        count = torch.zeros_like(x[:, :1])
        for cell, d in zip(cells, denoisers):
            if cell.tile is None:
                total += cell.view.invert(d(cell.view.apply(x), sigma, cond))
                count += 1
            else:
                rows, cols = cell.tile
                total[..., rows, cols] += d(x[..., rows, cols], sigma, cond)
                count[..., rows, cols] += 1
        return total / count

    return denoise
