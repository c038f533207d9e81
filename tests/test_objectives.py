"""The forward process and the training loss, against diffusers and against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from dreamlab.core.objectives import l_simple, loss_weights, q_sample, snr, target
from dreamlab.core.prediction import Prediction, to_x0
from dreamlab.core.schedules import DiscreteSchedule

PREDS = list(Prediction)
CASES = [("scaled_linear", "scaled_linear", 0.00085, 0.012), ("linear", "linear", 1e-4, 0.02), ("cosine", "squaredcos_cap_v2", 1e-4, 0.02)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _batch(b=16, seed=0):
    x0 = torch.randn(b, 4, 8, 8, generator=_gen(seed))
    noise = torch.randn(b, 4, 8, 8, generator=_gen(seed + 1))
    t = torch.cat([torch.tensor([0, 999]), torch.randint(0, 1000, (b - 2,), generator=_gen(seed + 2))])
    return x0, noise, t


def _pair(case):
    ours, theirs, start, end = case
    return DiscreteSchedule.from_betas(ours, 1000, start, end), DDPMScheduler(beta_schedule=theirs, beta_start=start, beta_end=end)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_q_sample_equals_diffusers_add_noise(case):
    sched, d = _pair(case)
    x0, noise, t = _batch()
    torch.testing.assert_close(q_sample(x0, t, noise, sched), d.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_v_target_equals_diffusers_get_velocity(case):
    sched, d = _pair(case)
    x0, noise, t = _batch(seed=3)
    torch.testing.assert_close(target(x0, noise, t, sched, Prediction.V), d.get_velocity(x0, noise, t), rtol=1e-6, atol=1e-6)


def test_eps_and_x0_targets():
    sched, _ = _pair(CASES[0])
    x0, noise, t = _batch(seed=5)
    assert torch.equal(target(x0, noise, t, sched, Prediction.EPS), noise)
    assert torch.equal(target(x0, noise, t, sched, Prediction.X0), x0)


@pytest.mark.parametrize("pred", PREDS, ids=lambda p: p.name)
def test_targets_decode_to_x0_through_the_sampler_conversions(pred):
    """Training and sampling agree: the target at (x_t, t), read by prediction.to_x0 at the same noise level
    in the sampler's form x = x_t / sqrt(alpha_bar), sigma = sqrt((1 - alpha_bar) / alpha_bar), is x0."""
    sched, _ = _pair(CASES[0])
    x0, noise, t = _batch(seed=7)
    x0, noise = x0.double(), noise.double()
    x_t = q_sample(x0, t, noise, sched)
    ac = sched.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    sigma = sched.sigmas[t]
    got = to_x0(target(x0, noise, t, sched, pred), x_t / ac.sqrt(), sigma, pred)
    torch.testing.assert_close(got, x0, rtol=1e-5, atol=1e-5)


def test_q_sample_moments():
    """x_t ~ N(sqrt(ab) x0, 1 - ab): check with many draws at a few t."""
    sched, _ = _pair(CASES[0])
    n = 200_000
    for t0 in (10, 500, 990):
        x0 = torch.full((n, 1), 0.8)
        t = torch.full((n,), t0)
        x_t = q_sample(x0, t, torch.randn(n, 1, generator=_gen(t0)), sched)
        ab = float(sched.alphas_cumprod[t0])
        assert abs(x_t.mean().item() - math.sqrt(ab) * 0.8) < 5 * math.sqrt((1 - ab) / n)
        assert abs(x_t.var().item() / (1 - ab) - 1) < 5 * math.sqrt(2 / n)


@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_min_snr_weights(gamma):
    sched, _ = _pair(CASES[0])
    t = torch.arange(0, 1000, 37)
    ab = sched.alphas_cumprod.double()[t]
    s = ab / (1 - ab)  # = (alpha / sigma)^2, diffusers' training_utils.compute_snr
    torch.testing.assert_close(snr(t, sched).double(), s, rtol=1e-6, atol=0)
    clipped = s.clamp(max=gamma)
    torch.testing.assert_close(loss_weights(t, sched, Prediction.EPS, gamma).double(), clipped / s, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss_weights(t, sched, Prediction.V, gamma).double(), clipped / (s + 1), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss_weights(t, sched, Prediction.X0, gamma).double(), clipped, rtol=1e-6, atol=0)
    # eps weights are 1 at high noise (snr < gamma) and gamma/snr < 1 at low noise
    w = loss_weights(t, sched, Prediction.EPS, gamma)
    assert (w <= 1 + 1e-6).all() and w[-1] == pytest.approx(1.0) and w[0] == pytest.approx(gamma / float(s[0]), rel=1e-5)
    assert torch.equal(loss_weights(t, sched, Prediction.EPS, None), torch.ones(len(t)))


@pytest.mark.parametrize("pred", PREDS, ids=lambda p: p.name)
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_l_simple_is_zero_at_the_target_and_positive_elsewhere(pred, gamma):
    sched, _ = _pair(CASES[0])
    x0, noise, t = _batch(seed=9)
    tgt = target(x0, noise, t, sched, pred)
    assert l_simple(tgt, x0, noise, t, sched, pred, min_snr_gamma=gamma).item() == 0.0
    off = tgt + 0.1 * torch.randn(tgt.shape, generator=_gen(10))
    loss = l_simple(off, x0, noise, t, sched, pred, min_snr_gamma=gamma)
    assert loss.item() > 0 and loss.ndim == 0
    # = mean over the batch of the weighted per-sample MSE
    per_sample = ((off - tgt) ** 2).flatten(1).mean(1)
    want = (loss_weights(t, sched, pred, gamma) * per_sample).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)


def test_l_simple_in_half_precision_is_computed_in_float32():
    sched, _ = _pair(CASES[0])
    x0, noise, t = _batch(seed=11)
    loss = l_simple(noise.half() + 0.01, x0, noise, t, sched, Prediction.EPS)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(1e-4, rel=0.05)


@pytest.mark.parametrize("pred", [Prediction.EPS, Prediction.V], ids=lambda p: p.name)
def test_linear_model_trained_on_l_simple_reaches_the_analytic_optimum(pred):
    """x0 ~ N(MU, S^2) in 1-D. At a fixed t, x_t = a x0 + b eps (a = sqrt(ab), b = sqrt(1 - ab)) and every
    target is linear in (x0, eps), so the minimiser of E(target - (k x_t + c))^2 is the regression line
        k = Cov(target, x_t) / Var(x_t),  c = E[target] - k E[x_t],
    eps: Cov = b, E = 0;  v = a eps - b x0: Cov = a b - b a S^2, E = -b MU.
    A per-t linear model trained by gradient descent on l_simple must reach it."""
    MU, S = 0.6, 0.4
    sched, _ = _pair(CASES[0])
    ts = torch.tensor([50, 400, 900])
    n = 30_000
    x0 = MU + S * torch.randn(n * len(ts), 1, generator=_gen(12))
    noise = torch.randn(n * len(ts), 1, generator=_gen(13))
    t = ts.repeat_interleave(n)
    x_t = q_sample(x0, t, noise, sched)
    idx = torch.arange(len(ts)).repeat_interleave(n)
    k = torch.zeros(len(ts), requires_grad=True)
    c = torch.zeros(len(ts), requires_grad=True)
    opt = torch.optim.SGD([k, c], lr=1.0)
    for _ in range(150):
        opt.zero_grad()
        out = k[idx, None] * x_t + c[idx, None]
        loss = l_simple(out, x0, noise, t, sched, pred)
        loss.backward()
        opt.step()

    ab = sched.alphas_cumprod.double()[ts]
    a, b = ab.sqrt(), (1 - ab).sqrt()
    var_xt = a**2 * S**2 + b**2
    if pred == Prediction.EPS:
        cov, mean = b, torch.zeros_like(b)
    else:
        cov, mean = a * b - b * a * S**2, -b * MU
    k_star = cov / var_xt
    c_star = mean - k_star * a * MU

    # 1. gradient descent converged to the least-squares line of this very sample
    tgt = target(x0, noise, t, sched, pred).double().reshape(len(ts), n)
    xs = x_t.double().reshape(len(ts), n)
    xc = xs - xs.mean(1, keepdim=True)
    k_ols = (xc * tgt).mean(1) / (xc**2).mean(1)
    c_ols = tgt.mean(1) - k_ols * xs.mean(1)
    torch.testing.assert_close(k.detach().double(), k_ols, rtol=0, atol=1e-3)
    torch.testing.assert_close(c.detach().double(), c_ols, rtol=0, atol=1e-3)
    # 2. which is the analytic optimum up to the sampling error of a regression on n points:
    #    se(k) = sd(residual) / (sd(x_t) sqrt(n)), se(c) <= se(k) * sqrt(E x_t^2) (5 standard errors)
    resid_var = var_target_fn(pred, a, b, S) - k_star**2 * var_xt
    se_k = (resid_var / (var_xt * n)).sqrt()
    se_c = se_k * (var_xt + (a * MU) ** 2).sqrt()
    assert ((k_ols - k_star).abs() <= 5 * se_k).all(), (k_ols, k_star, se_k)
    assert ((c_ols - c_star).abs() <= 5 * se_c).all(), (c_ols, c_star, se_c)
    # and the loss reached is the irreducible one: E Var(target | x_t) = Var(target) - k*^2 Var(x_t)
    assert loss.item() == pytest.approx(float(resid_var.mean()), rel=0.03)


def var_target_fn(pred, a, b, s):
    """Var of the target: eps has variance 1; v = a eps - b x0 has a^2 + b^2 s^2."""
    return torch.ones_like(b) if pred == Prediction.EPS else a**2 + b**2 * s**2
