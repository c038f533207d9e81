"""Every sampler against a Gaussian toy problem whose exact answer is known in closed form.

Data x0 ~ N(MU, S^2) independently per dimension. In the sampler's form x = x0 + sigma * eps the
marginal at sigma is N(MU, S^2 + sigma^2) and the exact denoiser is
    D(x, sigma) = E[x0 | x] = MU + S^2 / (S^2 + sigma^2) * (x - MU).
Every sampler ends with one step sigma_last -> 0 that returns D(x, sigma_last), the posterior mean, so an
exact sampler ends with mean MU and variance
    S^2 * S^2 / (S^2 + sigma_last^2)      (Var E[x0 | x_sigma_last]; S^2 up to 0.3% for a karras grid).

Because D is affine in x, every sampler is an affine map of its initial state and its injected noise:
    out - MU = a * (x_init - MU) + sum_k b_k * xi_k,
so the exact variance of what a given discretisation produces is a^2 Var(x_init) + sum_k b_k^2. We get a
and the b_k in closed form by running the sampler once on a batch of unit inputs (one-hot noise). That
separates the two kinds of error:
    * statistical: the sampled moments agree with the discretisation's exact moments (tight, 5 sigma);
    * discretisation: the exact moments converge to the true ones at the sampler's order as n grows.
"""

from __future__ import annotations

import math

import pytest
import torch

from dreamlab.core.noise import NoiseSource
from dreamlab.core.samplers import SAMPLERS, get_sampler, sample_euler
from dreamlab.core.schedules import DiscreteSchedule

MU, S = 0.7, 0.5
B, DIM = 64, 4096  # N = 262144 independent 1-D samples: rel. std of the sample variance = sqrt(2/N) = 0.28%
N_SAMPLES = B * DIM
Z = 5.0  # tolerance in standard errors

SCHEDULE = DiscreteSchedule.from_betas("scaled_linear")

# (id, sampler name, options, order of accuracy)
CONFIGS = [
    ("euler", "euler", {}, 1),
    ("ddim-eta0", "ddim", {"eta": 0.0}, 1),
    ("ddim-eta1", "ddim", {"eta": 1.0}, 1),
    ("ddpm", "ddpm", {}, 1),
    ("euler_ancestral", "euler_ancestral", {}, 1),
    ("heun", "heun", {}, 2),
    ("dpmpp_2m", "dpmpp_2m", {}, 2),
    ("dpmpp_2m_sde", "dpmpp_2m_sde", {}, 2),
]
IDS = [c[0] for c in CONFIGS]
# Samplers that are no ODE/SDE solvers: they need a consistency function, not this posterior mean, and
# are tested on this toy with its exact consistency function in test_distill.py.
CONSISTENCY = {"lcm"}

# Allowed relative bias of the variance at 50 steps (both spacings). First-order solvers are known to be
# several percent off at 50 steps on this problem (measured: euler -5.6% trailing / -6.6% karras,
# ancestral -12.8% / -13.2%); test_convergence_order proves the bias vanishes at the right rate.
ALLOW_50 = {
    "euler": 0.09,
    "ddim-eta0": 0.09,
    "ddim-eta1": 0.17,
    "ddpm": 0.17,
    "euler_ancestral": 0.17,
    "heun": 0.02,
    "dpmpp_2m": 0.02,
    "dpmpp_2m_sde": 0.045,
}


def test_every_registered_sampler_is_covered():
    assert {c[1] for c in CONFIGS} | CONSISTENCY == set(SAMPLERS)


def gaussian_denoiser(s: float = S, mu: float = MU):
    def denoise(x, sigma, cond=None):
        sg = sigma.reshape(-1, *(1,) * (x.ndim - 1)).to(x.dtype)
        return mu + s**2 / (s**2 + sg**2) * (x - mu)

    return denoise


def exact_final_var(sigmas: torch.Tensor, s: float = S) -> float:
    sl = float(sigmas[-2])
    return s**4 / (s**2 + sl**2)


def initial_state(sigmas: torch.Tensor, seed: int = 0, s: float = S) -> torch.Tensor:
    z = NoiseSource.for_batch(seed, B, (DIM,)).initial()
    return MU + math.sqrt(s**2 + float(sigmas[0]) ** 2) * z


def discretisation_var(sampler, opts: dict, sigmas: torch.Tensor, denoise=None) -> float:
    """Exact variance (float64, no sampling error) of the output of ``sampler`` on the toy problem."""
    denoise = denoise or gaussian_denoiser()
    n = len(sigmas) - 1
    x = torch.full((n + 1, 1), MU, dtype=torch.float64)
    x[0] += 1.0  # row 0: response to the initial state; row k+1: response to the noise of step k

    def one_hot(i: int) -> torch.Tensor:
        e = torch.zeros(n + 1, 1, dtype=torch.float64)
        e[i + 1] = 1.0
        return e

    out = sampler(denoise, x, sigmas.double(), noise=one_hot, **opts) - MU
    var0 = S**2 + float(sigmas[0]) ** 2
    return float(out[0, 0] ** 2 * var0 + (out[1:] ** 2).sum())


def moments_ok(out: torch.Tensor, mean: float, var: float, allow: float) -> bool:
    """Sample mean within Z standard errors; sample variance within Z standard errors plus ``allow``
    (relative). For Gaussian samples se(mean) = sqrt(var/N), se(var)/var = sqrt(2/(N-1))."""
    n = out.numel()
    m, v = out.double().mean().item(), out.double().var().item()
    mean_ok = abs(m - mean) <= Z * math.sqrt(var / n)
    var_ok = abs(v / var - 1) <= Z * math.sqrt(2 / (n - 1)) + allow
    return mean_ok and var_ok


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
@pytest.mark.parametrize("cid,name,opts,order", CONFIGS, ids=IDS)
def test_sampler_matches_gaussian_marginal(cid, name, opts, order, spacing):
    n = 50
    sigmas = SCHEDULE.sigmas_for(n, spacing)
    x = initial_state(sigmas)
    sampler = get_sampler(name)
    out = sampler(gaussian_denoiser(), x, sigmas, noise=NoiseSource.for_batch(1000, B, (DIM,)), **opts)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()

    target = exact_final_var(sigmas)
    # 1. against the truth: mean exact (every sampler is affine-equivariant), variance up to the
    #    documented discretisation allowance
    assert moments_ok(out, MU, target, ALLOW_50[cid]), (out.mean().item(), out.var().item(), target)

    # 2. tight: the sampled variance is that of this discretisation (catches wrong noise scaling,
    #    correlated noise across steps, noise drawn but not added, ...)
    v_disc = discretisation_var(sampler, opts, sigmas)
    assert moments_ok(out, MU, v_disc, 0.0), (out.var().item(), v_disc)
    assert abs(v_disc / target - 1) <= ALLOW_50[cid]


def test_moment_check_rejects_a_wrong_denoiser():
    """Sanity check of the tolerance: data std scaled by 1.2 (variance +44%) or a mean off by 0.02 fail."""
    sigmas = SCHEDULE.sigmas_for(50, "karras")
    for s_wrong, mu_wrong in [(S * 1.2, MU), (S * 1.05, MU), (S, MU + 0.02)]:
        x = mu_wrong + math.sqrt(s_wrong**2 + float(sigmas[0]) ** 2) * NoiseSource.for_batch(0, B, (DIM,)).initial()
        out = get_sampler("heun")(gaussian_denoiser(s_wrong, mu_wrong), x, sigmas)
        assert not moments_ok(out, MU, exact_final_var(sigmas), ALLOW_50["heun"]), (s_wrong, mu_wrong)
    # ... while the right one passes with the same code path
    x = initial_state(sigmas)
    out = get_sampler("heun")(gaussian_denoiser(), x, sigmas)
    assert moments_ok(out, MU, exact_final_var(sigmas), ALLOW_50["heun"])


def convergence_errors(sampler, opts, ns=(50, 100, 200), denoise=None) -> list[float]:
    errs = []
    for n in ns:
        sigmas = SCHEDULE.sigmas_for(n, "karras")
        errs.append(discretisation_var(sampler, opts, sigmas, denoise) / exact_final_var(sigmas) - 1)
    return errs


def converges_at_order(errs: list[float], order: int) -> bool:
    """Halving the step must divide the error by ~2^order, and the error at 200 steps must be small."""
    expected = 0.5**order
    ratios = [errs[i + 1] / errs[i] for i in range(len(errs) - 1)]
    bound = {1: 0.04, 2: 0.001}[order]
    return all(0.8 * expected <= r <= 1.25 * expected for r in ratios) and abs(errs[-1]) <= bound


@pytest.mark.parametrize("cid,name,opts,order", CONFIGS, ids=IDS)
def test_convergence_order(cid, name, opts, order):
    """On a karras grid the exact variance of each discretisation converges to the true one at the
    sampler's order (1: Euler/DDIM/ancestral; 2: Heun, DPM-Solver++(2M), its SDE variant)."""
    errs = convergence_errors(get_sampler(name), opts)
    assert converges_at_order(errs, order), errs


def test_convergence_check_rejects_a_wrong_coefficient():
    """An Euler step with a wrong coefficient (x moves (sigma_next/sigma)^1.1 of the way instead of
    sigma_next/sigma) does not converge; a denoiser evaluated at the wrong sigma does not either."""

    def wrong_euler(denoise, x, sigmas, *, cond=None, noise=None, on_step=None):
        for i in range(len(sigmas) - 1):
            d = denoise(x, sigmas[i].expand(x.shape[0]), cond)
            x = d + (x - d) * (sigmas[i + 1] / sigmas[i]) ** 1.1
        return x

    assert not converges_at_order(convergence_errors(wrong_euler, {}), 1)
    shifted = gaussian_denoiser()
    assert not converges_at_order(convergence_errors(sample_euler, {}, denoise=lambda x, s, c=None: shifted(x, s * 1.05)), 1)
    # and the real Euler passes through the very same helper
    assert converges_at_order(convergence_errors(sample_euler, {}), 1)


# ------------------------------------------------------------------------------------- equivalences


def _small_problem(spacing="trailing", n=30):
    sigmas = SCHEDULE.sigmas_for(n, spacing)
    x = MU + math.sqrt(S**2 + float(sigmas[0]) ** 2) * NoiseSource.for_batch(3, 8, (256,)).initial()
    return sigmas, x


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
def test_ddim_eta0_is_deterministic_and_equals_euler(spacing):
    sigmas, x = _small_problem(spacing)
    a = get_sampler("ddim")(gaussian_denoiser(), x, sigmas, noise=NoiseSource.for_batch(1, 8, (256,)), eta=0.0)
    b = get_sampler("ddim")(gaussian_denoiser(), x, sigmas, noise=NoiseSource.for_batch(99, 8, (256,)), eta=0.0)
    c = get_sampler("ddim")(gaussian_denoiser(), x, sigmas)  # default noise: torch.randn_like, unused
    assert torch.equal(a, b) and torch.equal(a, c)
    e = get_sampler("euler")(gaussian_denoiser(), x, sigmas)
    torch.testing.assert_close(a, e, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
def test_ddim_eta1_equals_ddpm_and_euler_ancestral(spacing):
    sigmas, x = _small_problem(spacing)
    ns = lambda: NoiseSource.for_batch(11, 8, (256,))  # noqa: E731
    ddim1 = get_sampler("ddim")(gaussian_denoiser(), x, sigmas, noise=ns(), eta=1.0)
    ddpm = get_sampler("ddpm")(gaussian_denoiser(), x, sigmas, noise=ns())
    anc = get_sampler("euler_ancestral")(gaussian_denoiser(), x, sigmas, noise=ns())
    torch.testing.assert_close(ddim1, ddpm, rtol=0, atol=1e-6)
    torch.testing.assert_close(ddim1, anc, rtol=0, atol=1e-6)
    # and the noise matters: another seed gives another result
    other = get_sampler("ddpm")(gaussian_denoiser(), x, sigmas, noise=NoiseSource.for_batch(12, 8, (256,)))
    assert not torch.allclose(ddpm, other)


@pytest.mark.parametrize("cid,name,opts,order", CONFIGS, ids=IDS)
def test_step_callbacks_and_denoiser_calls(cid, name, opts, order):
    """on_step fires once per step with the grid's sigmas; one denoiser call per step (Heun: two, except
    on its last step to sigma = 0), each with a (B,) sigma."""
    n = 12
    sigmas, x = _small_problem("karras", n)
    calls, infos = [], []
    base = gaussian_denoiser()

    def counting(x_, sigma, cond=None):
        assert sigma.shape == (x_.shape[0],)
        calls.append(float(sigma[0]))
        return base(x_, sigma, cond)

    get_sampler(name)(counting, x, sigmas, noise=NoiseSource.for_batch(0, 8, (256,)), on_step=infos.append, **opts)
    assert [i.i for i in infos] == list(range(n)) and all(i.total == n for i in infos)
    assert [i.sigma for i in infos] == pytest.approx(sigmas[:-1].tolist(), rel=1e-6)
    assert [i.sigma_next for i in infos] == pytest.approx(sigmas[1:].tolist(), rel=1e-6, abs=1e-12)
    assert len(calls) == (2 * n - 1 if name == "heun" else n)
    assert calls[0] == pytest.approx(float(sigmas[0]), rel=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_one_ddim_step_is_song_et_al_eq12(eta):
    """One step, written in the DDPM form from alphas_cumprod (Song et al. 2021, eq. 12 and 16):
        x_{t'} = sqrt(ab') x0 + sqrt(1 - ab' - s_t^2) eps_hat + s_t xi,
        s_t = eta sqrt((1 - ab') / (1 - ab)) sqrt(1 - ab / ab'),   eps_hat = (x_t - sqrt(ab) x0) / sqrt(1 - ab),
    (eta = 1 is DDPM's posterior q(x_{t'} | x_t, x0), Ho et al. eq. 7), compared in the sampler's form
    x = x_t / sqrt(ab)."""
    n = 10
    ts = SCHEDULE.timesteps(n, "trailing").long()
    sigmas = SCHEDULE.sigmas_for(n, "trailing")
    ab = SCHEDULE.alphas_cumprod.double()
    a, a_next = ab[ts[3]], ab[ts[4]]
    sig, sig_next = sigmas[3:5]
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * float(sig)
    x0 = torch.randn(4, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xi = torch.randn(4, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seen = []
    get_sampler("ddim")(
        lambda x_, s, c=None: x0, x, sigmas[3:].clone(), noise=lambda i: xi, eta=eta, on_step=seen.append
    )
    x_t = x * a.sqrt()
    eps_hat = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    s_t = eta * ((1 - a_next) / (1 - a)).sqrt() * (1 - a / a_next).sqrt()
    x_prev = a_next.sqrt() * x0 + (1 - a_next - s_t**2).sqrt() * eps_hat + s_t * xi
    torch.testing.assert_close(seen[0].x, x_prev / a_next.sqrt(), rtol=1e-9, atol=1e-9)
    assert seen[0].sigma_next == pytest.approx(float(sig_next))
