"""The forward process and the training objective (Ho et al. 2020, sec. 3.4).

    q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I)                            (eq. 4)
    L_simple = E_{t, x0, eps} || target - model(x_t, t) ||^2                               (eq. 14)
with target eps, v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022), or x0, and the
optional Min-SNR-gamma weighting (Hang et al. 2023): SNR = alpha_bar / (1 - alpha_bar),
    w = min(SNR, gamma) / SNR (eps),  min(SNR, gamma) / (SNR + 1) (v),  min(SNR, gamma) (x0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .prediction import Prediction
from .schedules import DiscreteSchedule


def _bc(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *(1,) * (x.ndim - 1)).to(x.dtype)


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, schedule: DiscreteSchedule) -> Tensor:
    """Sample x_t ~ q(x_t | x0) for integer timesteps t (B,), in the DDPM form the network sees."""
    ac = schedule.alphas_cumprod.to(x0.device)[t]
    return _bc(ac.sqrt(), x0) * x0 + _bc((1 - ac).sqrt(), x0) * noise


def target(x0: Tensor, noise: Tensor, t: Tensor, schedule: DiscreteSchedule, prediction: Prediction) -> Tensor:
    """What the network should output at (x_t, t) for the given parameterisation."""
    if prediction == Prediction.EPS:
        return noise
    if prediction == Prediction.X0:
        return x0
    if prediction == Prediction.V:
        ac = schedule.alphas_cumprod.to(x0.device)[t]
        return _bc(ac.sqrt(), x0) * noise - _bc((1 - ac).sqrt(), x0) * x0
    raise ValueError(f"unknown prediction type {prediction!r}")


def snr(t: Tensor, schedule: DiscreteSchedule) -> Tensor:
    ac = schedule.alphas_cumprod.to(t.device)[t].double()
    return (ac / (1 - ac)).float()


def loss_weights(t: Tensor, schedule: DiscreteSchedule, prediction: Prediction, min_snr_gamma: float | None) -> Tensor:
    """Per-sample weights (B,) of the squared error; all ones without Min-SNR."""
    if min_snr_gamma is None:
        return torch.ones(t.shape, device=t.device)
    s = snr(t, schedule)
    clipped = s.clamp(max=min_snr_gamma)
    if prediction == Prediction.EPS:
        return clipped / s
    if prediction == Prediction.V:
        return clipped / (s + 1)
    return clipped


def l_simple(
    model_out: Tensor,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    schedule: DiscreteSchedule,
    prediction: Prediction,
    *,
    min_snr_gamma: float | None = None,
) -> Tensor:
    """Mean over the batch of the (weighted) per-sample mean squared error."""
    err = (model_out.float() - target(x0, noise, t, schedule, prediction).float()) ** 2
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    return (loss_weights(t, schedule, prediction, min_snr_gamma) * per_sample).mean()


# ----------------------------------------------------------------------------------- distillation targets
# In the sampler's form x = x0 + sigma * eps, with per-row sigmas (B,), as the distillation trainer draws them.


def ddim_step(x: Tensor, x0: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """One deterministic DDIM step (Song et al. 2021, eq. 12; an Euler step in sigma) per row:
    x_next = x0 + (sigma_next / sigma) (x - x0). The teacher's solver step of consistency distillation and
    each of the two teacher steps of progressive distillation."""
    return x0 + _bc(sigma_next / sigma, x) * (x - x0)


def ddim_x0_target(x: Tensor, x_next: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """The x0 whose one DDIM step from (x, sigma) lands on x_next at sigma_next: progressive distillation's
    target after two teacher steps (Salimans & Ho 2022, Algorithm 2, x~ = (z'' - (s''/s) z) / (a'' - (s''/s) a)
    in the DDPM form), here x0 = (x_next - r x) / (1 - r), r = sigma_next / sigma; x_next itself when
    sigma_next = 0."""
    r = _bc(sigma_next / sigma, x)
    return (x_next - r * x) / (1 - r)


def truncated_snr_weight(sigma: Tensor) -> Tensor:
    """Salimans & Ho 2022's "truncated SNR" weighting of an x0 loss, max(SNR, 1) with SNR = 1 / sigma^2:
    like an eps loss at low noise, never zero at high noise (where an eps-weighted x0 loss vanishes)."""
    return (1 / sigma.double() ** 2).clamp(min=1.0).float()


def pseudo_huber(pred: Tensor, target: Tensor, c: float) -> Tensor:
    """The pseudo-Huber loss sqrt(d^2 + c^2) - c (Song & Dhariwal 2023, "Improved techniques for training
    consistency models", sec. 3.3; LCM's ``huber_c``), averaged over every element: quadratic below c,
    linear above, so a few large errors do not dominate."""
    d = pred.float() - target.float()
    return ((d**2 + c**2).sqrt() - c).mean()
