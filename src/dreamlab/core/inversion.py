"""DDIM inversion in sigma space: the deterministic probability-flow ODE run upwards.

With x = x0 + sigma * eps, a DDIM (eta 0) / Euler step from sigma_k down to sigma_{k+1} is
    x_{k+1} = D(x_k, sigma_k) + sigma_{k+1} / sigma_k * (x_k - D(x_k, sigma_k)).
Inversion walks the same grid upwards from the clean state: x at the smallest nonzero sigma is taken
to be x0 itself (sigma_min is about 0.03), and each step up evaluates the denoiser at the point it is at,
    x_k = D(x_{k+1}, sigma_{k+1}) + sigma_k / sigma_{k+1} * (x_{k+1} - D(x_{k+1}, sigma_{k+1})),
so sampling back retraces the path up to the difference between D at neighbouring points (first
order in the step; null-text inversion corrects it for guided sampling). ``refine`` fixed-point
iterations make each step the exact inverse of the DDIM step instead: solve
x_k = (x_{k+1} - (1 - r) D(x_k, sigma_k)) / r with r = sigma_{k+1} / sigma_k, starting from the Euler
guess (a contraction for the small steps of a sampling grid; one more evaluation per iteration).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .types import Cond, DenoiseFn


def ddim_step(x: Tensor, x0: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """One deterministic step from sigma to sigma_next given the x0 estimate (down or up)."""
    return x0 + (x - x0) * (sigma_next / sigma) if sigma > 0 else x0


def ddim_invert(denoise: DenoiseFn, x0: Tensor, sigmas: Tensor, cond: Cond | None = None, *,
                refine: int = 0) -> list[Tensor]:
    """The states x_k at each sigma_k of the descending grid ``sigmas`` (ending in 0) whose DDIM
    sampling ends at ``x0``: ``[x_0 (at sigmas[0]), ..., x_{n-1}, x0]`` (n + 1 states for n steps)."""
    grid = sigmas.tolist()
    n = len(grid) - 1

    def at(s: float) -> Tensor:
        return torch.full((x0.shape[0],), s, dtype=x0.dtype, device=x0.device)

    states = [x0]
    x = x0  # at sigmas[n - 1]; refined: the x whose x0 estimate there is x0 (the last step lands on it)
    for _ in range(refine if n > 1 else 0):
        x = x + (x0 - denoise(x, at(grid[n - 1]), cond))
    for k in range(n - 1, 0, -1):  # from sigma_k up to sigma_{k-1}
        states.append(x)
        target, r = x, grid[k] / grid[k - 1]
        x = ddim_step(x, denoise(x, at(grid[k]), cond), grid[k], grid[k - 1])
        for _ in range(refine):
            x = (target - (1 - r) * denoise(x, at(grid[k - 1]), cond)) / r
    states.append(x)
    return states[::-1]
