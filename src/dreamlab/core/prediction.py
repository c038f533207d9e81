"""What a network predicts, and the adapter that turns a discrete-time network into a denoiser.

In the sampler's form x = x0 + sigma * eps (see :mod:`dreamlab.core`), with the DDPM form
x_t = alpha * x0 + s * eps, alpha = 1 / sqrt(1 + sigma^2), s = sigma / sqrt(1 + sigma^2):
    eps prediction:  x0 = x - sigma * eps
    v prediction:    v = alpha * eps - s * x0  (Salimans & Ho 2022)  =>  x0 = alpha^2 * x - s * v
    x0 prediction:   x0 = x0
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import NonFiniteError
from .schedules import DiscreteSchedule
from .types import Cond, ModelCall, ModelFn, ModelWrapper


class Prediction(str, enum.Enum):
    """Values are diffusers' ``prediction_type`` strings."""

    EPS = "epsilon"
    V = "v_prediction"
    X0 = "sample"


def _b(sigma: Tensor, x: Tensor) -> Tensor:
    """Broadcast per-sample sigma (B,) or scalar over x (B, ...)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim)) if sigma.ndim else sigma


def to_x0(out: Tensor, x: Tensor, sigma: Tensor, prediction: Prediction) -> Tensor:
    """Model output of the given kind -> x0. ``x`` is in the x0 + sigma*eps form."""
    s = _b(sigma, x)
    if prediction == Prediction.EPS:
        return x - s * out
    if prediction == Prediction.V:
        return x / (1 + s**2) - s / (1 + s**2).sqrt() * out
    if prediction == Prediction.X0:
        return out
    raise ValueError(f"unknown prediction type {prediction!r}")


def from_x0(x0: Tensor, x: Tensor, sigma: Tensor, prediction: Prediction) -> Tensor:
    """x0 -> the model output of the given kind (inverse of :func:`to_x0`; needs sigma > 0 for eps)."""
    s = _b(sigma, x)
    if prediction == Prediction.EPS:
        return (x - x0) / s
    if prediction == Prediction.V:
        eps = (x - x0) / s
        return (eps - s * x0) / (1 + s**2).sqrt()
    if prediction == Prediction.X0:
        return x0
    raise ValueError(f"unknown prediction type {prediction!r}")


def convert(out: Tensor, x: Tensor, sigma: Tensor, src: Prediction, dst: Prediction) -> Tensor:
    return from_x0(to_x0(out, x, sigma, src), x, sigma, dst)


def consistency_scalings(t: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """LCM's boundary condition (Luo et al. 2023, eq. 5 after Song et al. 2023, eq. 9; diffusers'
    ``LCMScheduler.get_scalings_for_boundary_condition_discrete``), at (fractional) timesteps t:

        f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t),   c_skip = sd^2 / ((s t)^2 + sd^2),   c_out = s t / sqrt((s t)^2 + sd^2)

    with s = ``timestep_scaling``. f(x, 0) = x exactly, and from t = 1 on f is x0_hat to within 0.25%, so
    a student made from its teacher starts as the teacher. (diffusers applies c_skip to x_t, the DDPM form;
    here it multiplies x, the sampler's form, in which f(x, 0) = x holds exactly. They differ by a factor
    sqrt(alpha_bar_t) on a term that is nonzero only below t = 1.)"""
    st = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def step_index(sigmas: Tensor, sigma: Tensor) -> int:
    """The index in a sampler's descending grid of the point nearest ``sigma`` (its first row): the step
    a controller is at, from the sigma it is called with, never from counting calls."""
    return int(torch.argmin((sigmas.to(sigma.device, torch.float64) - float(sigma.reshape(-1)[0])).abs()))


@dataclass(eq=False)
class Denoiser:
    """Adapter: discrete-time network -> ``(x, sigma, cond) -> x0``, and the loss that trains it.

    Maps sigma to a fractional timestep through the training schedule, scales the input to the DDPM
    form the network was trained on, and converts its prediction to x0. Runs the network in
    ``model_dtype`` if given; returns x0 in the dtype of ``x``.

    ``wrappers`` (model wrappers) see every network call, with the current x_t, t and conditioning, and
    may add inputs (ControlNet residuals, concatenated latents); ``sigmas``, the sampler's grid, gives each
    call its step index. Training calls :meth:`loss`, which goes through the same wrappers, network
    function and schedule (as k-diffusion's ``loss`` and ``forward`` share ``get_scalings``), so a student
    and its teacher, or a ControlNet and its base, are called exactly as they are at sampling.

    ``consistency``: the network is a consistency model (a consistency-distilled student); what it returns
    goes through the boundary condition of :func:`consistency_scalings`, at sampling and in distillation
    alike (the distillation trainer calls this denoiser).
    """

    model: ModelFn
    schedule: DiscreteSchedule
    prediction: Prediction = Prediction.EPS
    model_dtype: torch.dtype | None = None
    check_finite: bool = True
    wrappers: tuple[ModelWrapper, ...] = ()
    sigmas: Tensor | None = None
    consistency: bool = False

    def network(self, call: ModelCall) -> Tensor:
        """The network's raw output for one call, after the model wrappers."""
        for wrap in self.wrappers:
            call = wrap(call)
        return self.model(call)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
        s = _b(sigma, x)
        x_t = x * (1 + s**2).rsqrt()
        t = self.schedule.sigma_to_t(sigma.float())
        if self.model_dtype is not None:
            x_t = x_t.to(self.model_dtype)
        step = step_index(self.sigmas, sigma) if self.sigmas is not None else None
        out = self.network(ModelCall(x_t, t, cond, sigma=sigma, step=step)).to(x.dtype)
        # One reduction: the float32 sum is finite iff every element is (barring overflow past 3e38).
        if self.check_finite and not torch.isfinite(out.sum(dtype=torch.float32)):
            raise NonFiniteError(
                f"the model produced NaN or Inf at sigma={float(sigma[0]):.4g} (t={float(t[0]):.1f}); "
                "check the weights and the input, or run in float32"
            )
        x0 = to_x0(out, x, sigma, self.prediction)
        if self.consistency:
            c_skip, c_out = consistency_scalings(t)
            x0 = _b(c_skip.to(x.dtype), x) * x + _b(c_out.to(x.dtype), x) * x0
        return x0

    def loss(self, x0: Tensor, noise: Tensor, t: Tensor, cond: Cond | None = None, *,
             min_snr_gamma: float | None = None) -> Tensor:
        """L_simple (Ho et al. 2020) at integer training timesteps ``t`` (B,): x_t drawn from q(x_t | x0)
        with ``noise``, the network called as at sampling, its output against this model's target."""
        from .objectives import l_simple, q_sample  # (objectives imports Prediction from here)

        x_t = q_sample(x0, t, noise, self.schedule)
        out = self.network(ModelCall(x_t, t, cond))
        return l_simple(out.float(), x0, noise, t, self.schedule, self.prediction, min_snr_gamma=min_snr_gamma)
