"""MultiDiffusion (Bar-Tal et al. 2023): a canvas larger than the model, denoised as overlapping windows
of the model's native size whose x0 estimates are averaged at every step, through the one sampling loop.

Each window is a cell (``cells.py``) denoised by its own denoiser, so a window can carry its own
guidance (the regional prompts cropped to it). One window covering the whole canvas is plain
generation, bit for bit (its estimate divided by a count of one)."""

from __future__ import annotations

from dataclasses import dataclass

Tile = tuple[slice, slice]  # rows, columns of the latent canvas


def starts(size: int, window: int, stride: int) -> list[int]:
    """Window starts covering [0, size) with the last window flush with the end."""
    if size <= window:
        return [0]
    out = list(range(0, size - window + 1, stride))
    if out[-1] != size - window:
        out.append(size - window)
    return out


@dataclass(frozen=True)
class Windows:
    height: int  # latent canvas
    width: int
    window: int  # latent window side (the model's native size)
    stride: int

    def tiles(self) -> list[Tile]:
        wh, ww = min(self.window, self.height), min(self.window, self.width)
        return [(slice(y, y + wh), slice(x, x + ww))
                for y in starts(self.height, wh, self.stride) for x in starts(self.width, ww, self.stride)]
