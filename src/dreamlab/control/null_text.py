"""Null-text inversion (Mokady et al. 2022): per-step unconditional embeddings that make guided DDIM
sampling retrace an image's DDIM-inversion path.

DDIM inversion (``core.inversion``) is close to exact without guidance, but classifier-free guidance
amplifies its small per-step error. Null-text inversion keeps the prompt's embedding and, step by step,
optimises the unconditional ("null") embedding so that one guided DDIM step from where the sampler is
lands on the inverted path's next state (Algorithm 1 of the paper: a few Adam steps each, early stopping
when the error is small). Sampling with :class:`StepUncondCFG` and those embeddings then reconstructs
the image, and prompt-to-prompt can edit it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..core.guiders import CFG
from ..core.inversion import ddim_step
from ..core.prediction import step_index
from ..core.types import Cond, DenoiseFn


def null_text_inversion(denoise: DenoiseFn, path: list[Tensor], sigmas: Tensor, cond: Cond, uncond: Cond,
                        scale: float, *, iters: int = 10, lr: float = 1e-2, tol: float = 1e-5,
                        progress=None) -> list[Tensor]:
    """The unconditional token states of each step (n tensors shaped like ``uncond.tokens``) for the
    inverted ``path`` (n + 1 states, ``ddim_invert``'s) on the grid ``sigmas``."""
    grid = sigmas.tolist()
    n = len(grid) - 1
    x = path[0]
    tokens = uncond.tokens.detach().clone()
    out = []
    for k in range(n):
        s, s_next = grid[k], grid[k + 1]
        sig = torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            x0_c = denoise(x, sig, cond)
        tokens = tokens.detach().requires_grad_(True)
        opt = torch.optim.Adam([tokens], lr=lr * (1 - k / (2 * n)))
        for j in range(iters):
            with torch.enable_grad():
                x0_u = denoise(x, sig, replace(uncond, tokens=tokens))
                x_next = ddim_step(x, x0_u + scale * (x0_c - x0_u), s, s_next)
                loss = torch.nn.functional.mse_loss(x_next, path[k + 1])
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            if loss.item() < tol + k * 2e-5:
                break
        tokens = tokens.detach()
        out.append(tokens.clone())
        with torch.no_grad():
            x0_u = denoise(x, sig, replace(uncond, tokens=tokens))
            x = ddim_step(x, x0_u + scale * (x0_c - x0_u), s, s_next)
        if progress is not None:
            progress(k, n)
    return out


@dataclass(eq=False)
class StepUncondCFG:
    """Classifier-free guidance whose unconditional embedding changes with the step (null-text
    inversion's): the step comes from the sigma grid, as everywhere in the engine."""

    uncond: Cond
    tokens: list[Tensor]  # per step
    sigmas: Tensor
    scale: float
    _guiders: dict[int, CFG] = field(default_factory=dict)
    _last: list[CFG] = field(default_factory=list)

    def _guider(self, sigma: Tensor) -> CFG:
        k = min(step_index(self.sigmas, sigma), len(self.tokens) - 1)
        if k not in self._guiders:
            self._guiders[k] = CFG(replace(self.uncond, tokens=self.tokens[k]), self.scale)
        return self._guiders[k]

    def prepare(self, x, sigma, cond):
        g = self._guider(sigma)
        self._last[:] = [g]
        return g.prepare(x, sigma, cond)

    def combine(self, x, sigma, x0):
        return self._last[0].combine(x, sigma, x0)
