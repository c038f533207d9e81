"""Noise schedules: betas -> alphas_cumprod -> sigmas, and the sigma grids samplers walk.

A discrete-time model is trained at steps t = 0..T-1 with
    x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps          (DDPM, Ho et al. 2020, eq. 4)
which is x = x0 + sigma_t * eps with x = x_t / sqrt(alpha_bar_t) and
    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t).
A sampler walks a descending grid sigmas[0] > ... > sigmas[n-1] > sigmas[n] = 0 (n steps).

Spacings reproduce diffusers' ``timestep_spacing`` exactly, so that a dreamlab sampler and a diffusers
scheduler visit the same noise levels:
    leading   t_i = (n-1-i) * (T // n) + steps_offset           (DDPM/DDIM/Euler "leading")
    trailing  t_i = round(T - i * T / n) - 1                     (Lin et al. 2023; diffusers "trailing")
    linspace  t_i = round(linspace(T-1, 0, n))                   (DDIM/DDPM "linspace")
    karras    sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho   (Karras et al. eq. 5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, get_args

import torch
from torch import Tensor

BetaSchedule = Literal["linear", "scaled_linear", "cosine"]
Spacing = Literal["leading", "trailing", "linspace", "karras"]
SPACINGS: tuple[str, ...] = get_args(Spacing)


def make_betas(
    kind: BetaSchedule,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> Tensor:
    """Betas as diffusers builds them (float32, so alphas_cumprod agree bit for bit).

    linear:        Ho et al. 2020 (their values: beta_start=1e-4, beta_end=0.02)
    scaled_linear: Stable Diffusion, linear in sqrt(beta)
    cosine:        Nichol & Dhariwal 2021, alpha_bar(t) = cos^2((t/T + 0.008) / 1.008 * pi/2), beta <= 0.999
    """
    T = num_train_timesteps
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if kind == "cosine":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unknown beta schedule '{kind}'; known: linear, scaled_linear, cosine")


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """The noise levels a discrete-time model was trained at, indexed by t = 0..T-1."""

    alphas_cumprod: Tensor  # (T,) float32, as the model's trainer used it

    @classmethod
    def from_betas(
        cls,
        kind: BetaSchedule = "scaled_linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
    ) -> "DiscreteSchedule":
        betas = make_betas(kind, num_train_timesteps, beta_start, beta_end)
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "DiscreteSchedule":
        """From a diffusers scheduler config (``scheduler_config.json``)."""
        kind = config.get("beta_schedule", "linear")
        kind = {"squaredcos_cap_v2": "cosine"}.get(kind, kind)
        if kind not in get_args(BetaSchedule):
            raise ValueError(f"unsupported beta_schedule '{kind}' in scheduler config")
        return cls.from_betas(
            kind,
            int(config.get("num_train_timesteps", 1000)),
            float(config.get("beta_start", 0.0001)),
            float(config.get("beta_end", 0.02)),
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @cached_property
    def sigmas(self) -> Tensor:
        """(T,) float64, ascending in t."""
        ac = self.alphas_cumprod.double()
        return ((1 - ac) / ac).sqrt()

    def _log_sigmas(self, device: torch.device) -> Tensor:
        # Cached per device: the samplers map sigma -> t at every step.
        cache = self.__dict__.setdefault("_log_sigmas_by_device", {})
        if device not in cache:
            cache[device] = self.sigmas.log().to(device)
        return cache[device]

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep of each sigma, interpolating linearly in log sigma (as k-diffusion and
        diffusers' ``_sigma_to_t``). Exact at the training sigmas; clamped to [0, T-1]."""
        log_sigmas = self._log_sigmas(sigma.device)
        log_sigma = sigma.double().clamp_min(1e-30).log()
        low = torch.searchsorted(log_sigmas, log_sigma, right=True).sub(1).clamp(0, len(log_sigmas) - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (low + w).to(sigma.dtype if sigma.is_floating_point() else torch.float32)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at a (fractional) timestep, interpolating log sigma."""
        log_sigmas = self._log_sigmas(t.device)
        t = t.double().clamp(0, len(log_sigmas) - 1)
        low = t.floor().long().clamp(max=len(log_sigmas) - 2)
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()

    def timesteps(self, n: int, spacing: Literal["leading", "trailing", "linspace"], steps_offset: int = 0) -> Tensor:
        """n integer timesteps, descending, as diffusers' DDPM/DDIM/Euler ``set_timesteps``."""
        T = self.num_train_timesteps
        _check_steps(n, T)
        # Python float64 arithmetic in the order numpy uses, so ties round as in diffusers.
        if spacing == "leading":
            ts = [(n - 1 - i) * (T // n) + steps_offset for i in range(n)]
        elif spacing == "trailing":
            # np.arange(T, 0, -T/n) as diffusers calls it: numpy fills start + i * delta with
            # delta = (start + step) - start. It yields n + 1 values for some n (61, 103, ...); take n.
            delta = (T + (-T / n)) - T
            ts = [round(T + i * delta) - 1 for i in range(n)]
        elif spacing == "linspace":
            step = (T - 1) / (n - 1) if n > 1 else 0.0
            ts = [round(i * step) for i in range(n - 1)] + [T - 1]
            ts = ts[::-1] if n > 1 else [T - 1]
        else:
            raise ValueError(f"unknown timestep spacing '{spacing}'; known: leading, trailing, linspace")
        ts = torch.tensor(ts, dtype=torch.float64)
        return ts

    def sigmas_for(self, n: int, spacing: Spacing = "trailing", *, rho: float = 7.0) -> Tensor:
        """The grid of n steps: (n + 1,) float64 sigmas, descending, ending in 0."""
        if spacing == "karras":
            _check_steps(n, None)
            return karras(n, self.sigma_min, self.sigma_max, rho)
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing '{spacing}'; known: {', '.join(SPACINGS)}")
        sig = self.sigmas[self.timesteps(n, spacing).long()]
        return torch.cat([sig, sig.new_zeros(1)])

    def sigmas_below(self, n: int, spacing: Spacing, strength: float, *, rho: float = 7.0) -> Tensor:
        """img2img for a sampler that keeps its steps (``samplers.keeps_steps``): the n-step grid of
        ``spacing`` squeezed onto the levels below ``strength``. Timesteps map as t -> (t + 1) * strength - 1
        (fractional; sigma interpolated in log sigma), so the grid starts where :func:`truncate`'s would,
        at t = strength * T - 1 for ``trailing``, but keeps all n steps. karras runs from sigma_min to that
        start. strength=1 is :meth:`sigmas_for`; a start below t = 0 keeps no step (the grid [0])."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be within [0, 1], got {strength}")
        if strength == 1.0:
            return self.sigmas_for(n, spacing, rho=rho)
        T = self.num_train_timesteps
        start = strength * T - 1
        if start <= 0:
            return torch.zeros(1, dtype=torch.float64)
        if spacing == "karras":
            _check_steps(n, None)
            return karras(n, self.sigma_min, float(self.t_to_sigma(torch.tensor(start))), rho)
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing '{spacing}'; known: {', '.join(SPACINGS)}")
        t = ((self.timesteps(n, spacing) + 1) * strength - 1).clamp(min=0)
        sig = self.t_to_sigma(t)
        return torch.cat([sig, sig.new_zeros(1)])


def _check_steps(n: int, T: int | None) -> None:
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"steps must be a positive integer, got {n!r}")
    if T is not None and n > T:
        raise ValueError(f"steps ({n}) cannot exceed the model's {T} training timesteps")


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: n sigmas from sigma_max to sigma_min, then 0. (n + 1,) float64."""
    _check_steps(n, None)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"karras needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sig = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sig, sig.new_zeros(1)])


def truncate(sigmas: Tensor, strength: float) -> Tensor:
    """The tail of a grid for img2img (SDEdit, Meng et al. 2021): noise the input to sigmas[k] and
    denoise from there. strength=1 keeps every step; 0 keeps none (only the final 0). Matches
    diffusers' img2img: int(n * strength) steps are kept."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be within [0, 1], got {strength}")
    n = sigmas.shape[0] - 1
    keep = min(int(n * strength), n)
    return sigmas[n - keep:]
