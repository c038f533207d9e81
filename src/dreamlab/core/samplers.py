"""Samplers: plain functions that walk a sigma grid with a denoiser.

Every sampler has the signature ``sample(denoise, x, sigmas, *, cond=None, noise=None, on_step=None,
**options) -> x`` where ``x`` starts at sigmas[0] in the form x0 + sigma * eps and ``sigmas`` ends in 0.
Each makes one denoiser call per step (Heun two, except on its last step) and knows nothing about
models or prompts. The equations are those of Karras et al. 2022 (the probability-flow ODE
dx/dsigma = (x - x0(x, sigma)) / sigma) and k-diffusion.

Equivalences, exact in this form (and checked against diffusers in the tests):
    ddim(eta=0)  == euler                               (Song et al. 2021, eq. 12 is an Euler step in sigma)
    ddim(eta=1)  == ddpm == euler_ancestral(eta=1)      (the posterior q(x_{t-1} | x_t, x0) of Ho et al.)
    lcm          == euler_ancestral(eta -> inf)         (sigma_down = 0: all of sigma_next is fresh noise)

``lcm`` is not a solver of the ODE: it expects the denoiser to be a consistency function, which maps any
x on a trajectory to that trajectory's end (a consistency-distilled student). With a plain denoiser
(E[x0 | x]) it returns too little variance.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Protocol

import torch
from torch import Tensor

from ..errors import UnknownNameError
from .types import Cond, DenoiseFn, NoiseFn, StepCallback, StepInfo


class Sampler(Protocol):
    def __call__(
        self,
        denoise: DenoiseFn,
        x: Tensor,
        sigmas: Tensor,
        *,
        cond: Cond | None = None,
        noise: NoiseFn | None = None,
        on_step: StepCallback | None = None,
    ) -> Tensor: ...


SAMPLERS: dict[str, Sampler] = {}
STOCHASTIC: set[str] = set()
KEEPS_STEPS: set[str] = set()  # img2img keeps all the requested steps (schedules.sigmas_below), see keeps_steps


def register(name: str, *, stochastic: bool = False, keeps_steps: bool = False) -> Callable[[Sampler], Sampler]:
    def deco(fn: Sampler) -> Sampler:
        SAMPLERS[name] = fn
        if stochastic:
            STOCHASTIC.add(name)
        if keeps_steps:
            KEEPS_STEPS.add(name)
        return fn

    return deco


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise UnknownNameError(f"unknown sampler '{name}'; known: {', '.join(sorted(SAMPLERS))}") from None


def takes_eta(name: str) -> bool:
    """Whether the sampler has an ``eta`` option (the noise of ddim / ancestral / sde samplers)."""
    return "eta" in inspect.signature(get_sampler(name)).parameters


def keeps_steps(name: str) -> bool:
    """Whether img2img with this sampler runs all the requested steps below the strength's noise level
    (``DiscreteSchedule.sigmas_below``) instead of the tail of the full grid (``schedules.truncate``). A
    consistency sampler can start anywhere: each of its steps jumps to x0, so at 4 steps a strength of
    0.2 still gets 4 steps, not int(4 * 0.2) = 0."""
    get_sampler(name)
    return name in KEEPS_STEPS


# ---------------------------------------------------------------------------------------------- helpers


def _prepare(x: Tensor, sigmas: Tensor) -> Tensor:
    if sigmas.ndim != 1 or sigmas.shape[0] < 1:
        raise ValueError("sigmas must be a 1-D grid ending in 0")
    # Sigma arithmetic in at least float32 even when the state is half precision.
    return sigmas.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))


def _report(on_step: StepCallback | None, i: int, sigmas: Tensor, x: Tensor, denoised: Tensor) -> Tensor:
    """Tell ``on_step`` about step i; the state to go on from (a callback may return a replacement:
    local blending, ILVR's low-frequency replacement)."""
    if on_step is not None:
        out = on_step(StepInfo(i, len(sigmas) - 1, float(sigmas[i]), float(sigmas[i + 1]), x, denoised))
        if out is not None:
            return out
    return x


def _noise_or_default(noise: NoiseFn | None, x: Tensor) -> NoiseFn:
    # Not reproducible across batch sizes: generate() always passes a NoiseSource.
    return noise if noise is not None else (lambda _step: torch.randn_like(x))


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 3 with sigma(t) = t)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic part to sigma_down and fresh noise of
    std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2. eta=1 gives the DDPM posterior
    variance sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2; eta=0 adds no noise (DDIM)."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def _ancestral_loop(denoise, x, sigmas, cond, noise, on_step, eta: float) -> Tensor:
    sigmas = _prepare(x, sigmas)
    noise = _noise_or_default(noise, x)
    grid = sigmas.tolist()  # step arithmetic on Python floats (float64): no tiny tensor ops per step
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = grid[i], grid[i + 1]
        denoised = denoise(x, sigmas[i].expand(x.shape[0]), cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + (x - denoised) * (sigma_down / sigma)  # Euler step to sigma_down
        if sigma_up > 0:
            x = x + noise(i) * sigma_up
        x = _report(on_step, i, sigmas, x, denoised)
    return x


# --------------------------------------------------------------------------------------------- samplers


@register("euler")
def sample_euler(denoise, x, sigmas, *, cond=None, noise=None, on_step=None) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without the 2nd order)."""
    return _ancestral_loop(denoise, x, sigmas, cond, noise, on_step, eta=0.0)


@register("ddim", stochastic=True)
def sample_ddim(denoise, x, sigmas, *, cond=None, noise=None, on_step=None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12). eta=0 is deterministic; eta=1 is DDPM. Stochastic only if eta>0."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return _ancestral_loop(denoise, x, sigmas, cond, noise, on_step, eta=eta)


@register("ddpm", stochastic=True)
def sample_ddpm(denoise, x, sigmas, *, cond=None, noise=None, on_step=None) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2): x_{t-1} ~ q(x_{t-1} | x_t, x0 = D(x_t)), with the
    posterior variance beta~_t (diffusers' ``variance_type="fixed_small"``)."""
    return _ancestral_loop(denoise, x, sigmas, cond, noise, on_step, eta=1.0)


@register("euler_ancestral", stochastic=True)
def sample_euler_ancestral(denoise, x, sigmas, *, cond=None, noise=None, on_step=None, eta: float = 1.0) -> Tensor:
    """Euler step to sigma_down, then fresh noise up to sigma_next (k-diffusion)."""
    return _ancestral_loop(denoise, x, sigmas, cond, noise, on_step, eta=eta)


@register("heun")
def sample_heun(denoise, x, sigmas, *, cond=None, noise=None, on_step=None) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); Euler on the last step to sigma=0."""
    sigmas = _prepare(x, sigmas)
    B = x.shape[0]
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma.expand(B), cond)
        d = to_d(x, sigma, denoised)
        x_next = x + d * (sigma_next - sigma)
        if sigma_next > 0:
            d_next = to_d(x_next, sigma_next, denoise(x_next, sigma_next.expand(B), cond))
            x_next = x + (d + d_next) / 2 * (sigma_next - sigma)
        x = x_next
        x = _report(on_step, i, sigmas, x, denoised)
    return x


@register("dpmpp_2m")
def sample_dpmpp_2m(denoise, x, sigmas, *, cond=None, noise=None, on_step=None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), multistep in lambda = -log sigma; first order on
    the first step and on the last step to sigma = 0 (diffusers' ``lower_order_final``)."""
    sigmas = _prepare(x, sigmas)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma.expand(x.shape[0]), cond)
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            d = denoised
            if old_denoised is not None:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - torch.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        x = _report(on_step, i, sigmas, x, denoised)
    return x


@register("dpmpp_2m_sde", stochastic=True)
def sample_dpmpp_2m_sde(denoise, x, sigmas, *, cond=None, noise=None, on_step=None, eta: float = 1.0) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022), midpoint variant, as k-diffusion and diffusers'
    ``algorithm_type="sde-dpmsolver++"``. eta scales the injected noise (0 gives an ODE solver)."""
    sigmas = _prepare(x, sigmas)
    noise = _noise_or_default(noise, x)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma.expand(x.shape[0]), cond)
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            eta_h = eta * h
            x = (sigma_next / sigma) * torch.exp(-eta_h) * x - torch.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x - 0.5 * torch.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
            if eta > 0:
                x = x + noise(i) * sigma_next * (-torch.expm1(-2 * eta_h)).sqrt()
            h_last = h
        old_denoised = denoised
        x = _report(on_step, i, sigmas, x, denoised)
    return x


@register("lcm", stochastic=True, keeps_steps=True)
def sample_lcm(denoise, x, sigmas, *, cond=None, noise=None, on_step=None) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; LCM, Luo et al. 2023, Algorithm 3).

    At each step x0 = f(x, sigma), then fresh noise to the next level: x = x0 + sigma_next * z; the last
    step returns x0. ``denoise`` must be a consistency function (a consistency-distilled student), for which
    every step is exact wherever it starts: any grid works, and ``trailing`` with 1-8 steps is the usual
    one (LCMScheduler starts at t = T - 1 too). In the DDPM form this is LCMScheduler's
    ``prev_sample = sqrt(ab_prev) * denoised + sqrt(1 - ab_prev) * noise``."""
    sigmas = _prepare(x, sigmas)
    noise = _noise_or_default(noise, x)
    grid = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i].expand(x.shape[0]), cond)
        x = denoised + noise(i) * grid[i + 1] if grid[i + 1] > 0 else denoised
        x = _report(on_step, i, sigmas, x, denoised)
    return x


def prior_std(sigma_max: float, data_std: float = 1.0) -> float:
    """Std of x at sigma_max: x = x0 + sigma * eps with x0 of std ``data_std`` (1 for a DDPM prior)."""
    return math.sqrt(sigma_max**2 + data_std**2)
