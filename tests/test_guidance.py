"""Guidance wrappers: classifier-free guidance (with rescale), dynamic thresholding, and gradient
(classifier) guidance, the last one against the exact Gaussian posterior from Bayes' rule."""

from __future__ import annotations

import math

import pytest
import torch

from dreamlab.core.guidance import classifier_free, dynamic_threshold, gradient_guidance
from dreamlab.core.noise import NoiseSource
from dreamlab.core.samplers import get_sampler
from dreamlab.core.schedules import DiscreteSchedule
from dreamlab.core.types import Cond

SHAPE = (3, 4, 8, 8)


def toy(x, sigma, cond):
    """Deterministic, per-sample, depends on x, sigma and cond.tokens."""
    assert cond is not None and cond.tokens is not None
    w = cond.tokens.mean(dim=(1, 2)).reshape(-1, *(1,) * (x.ndim - 1))
    s = sigma.reshape(-1, *(1,) * (x.ndim - 1))
    return torch.tanh(x / (1 + s**2).sqrt()) * w + 0.1 * w**2


class Counting:
    """Records the batch size of every call; optionally insists that cond's batch equals x's."""

    def __init__(self, fn=toy, strict_batch=False):
        self.fn, self.strict_batch, self.batches = fn, strict_batch, []

    def __call__(self, x, sigma, cond):
        self.batches.append((x.shape[0], sigma.shape[0], None if cond is None else cond.tokens.shape[0]))
        if self.strict_batch:
            assert cond.tokens.shape[0] == x.shape[0] == sigma.shape[0], self.batches[-1]
        return self.fn(x, sigma, cond)


def _tokens(seed, b=SHAPE[0], offset=0.0):
    return torch.randn(b, 5, 16, generator=torch.Generator().manual_seed(seed)) + offset


@pytest.fixture
def inputs():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.tensor([0.5, 2.0, 7.0])
    cond = Cond(tokens=_tokens(1, offset=0.5))
    uncond = Cond(tokens=_tokens(2, offset=-0.2))
    return x, sigma, cond, uncond


def test_toy_depends_on_cond(inputs):
    x, sigma, cond, uncond = inputs
    assert not torch.allclose(toy(x, sigma, cond), toy(x, sigma, uncond), atol=1e-3)


def test_scale_one_is_the_conditional_prediction(inputs):
    x, sigma, cond, uncond = inputs
    torch.testing.assert_close(classifier_free(toy, uncond, 1.0)(x, sigma, cond), toy(x, sigma, cond), rtol=0, atol=0)


def test_scale_zero_is_the_unconditional_prediction(inputs):
    x, sigma, cond, uncond = inputs
    torch.testing.assert_close(classifier_free(toy, uncond, 0.0)(x, sigma, cond), toy(x, sigma, uncond), rtol=0, atol=1e-6)


@pytest.mark.parametrize("w", [-1.0, 0.5, 2.0, 7.5, 15.0])
def test_scale_w_is_u_plus_w_c_minus_u(inputs, w):
    x, sigma, cond, uncond = inputs
    c, u = toy(x, sigma, cond), toy(x, sigma, uncond)  # two separate calls
    torch.testing.assert_close(classifier_free(toy, uncond, w)(x, sigma, cond), u + w * (c - u), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("w,rescale", [(7.5, 0.0), (7.5, 0.7), (3.0, 1.0)])
def test_cond_and_uncond_run_in_one_batched_call(inputs, w, rescale):
    x, sigma, cond, uncond = inputs
    counting = Counting(strict_batch=True)
    classifier_free(counting, uncond, w, rescale=rescale)(x, sigma, cond)
    b = x.shape[0]
    assert counting.batches == [(2 * b, 2 * b, 2 * b)]


def test_batch_one_uncond_is_broadcast(inputs):
    x, sigma, cond, uncond = inputs
    one = Cond(tokens=uncond.tokens[:1])
    rep = Cond(tokens=one.tokens.expand(x.shape[0], -1, -1).clone())
    counting = Counting(strict_batch=True)
    got = classifier_free(counting, one, 5.0)(x, sigma, cond)
    torch.testing.assert_close(got, classifier_free(toy, rep, 5.0)(x, sigma, cond), rtol=0, atol=0)


def test_batch_one_uncond_is_broadcast_at_scale_zero(inputs):
    x, sigma, cond, uncond = inputs
    one = Cond(tokens=uncond.tokens[:1])
    classifier_free(Counting(strict_batch=True), one, 0.0)(x, sigma, cond)


def test_one_guided_denoiser_follows_a_change_of_cond(inputs):
    """The guided function may cache the batched cond; a new cond (or a new batch) must not see a stale one."""
    x, sigma, cond, uncond = inputs
    guided = classifier_free(toy, uncond, 3.0)
    other = Cond(tokens=_tokens(5, offset=2.0))
    for c in (cond, other, cond, other):
        want = toy(x, sigma, uncond) + 3.0 * (toy(x, sigma, c) - toy(x, sigma, uncond))
        torch.testing.assert_close(guided(x, sigma, c), want, rtol=1e-6, atol=1e-5)
    # the same guided function on a batch of one with a batch-1 uncond
    one_u, one_c = Cond(tokens=uncond.tokens[:1]), Cond(tokens=cond.tokens[:1])
    guided1 = classifier_free(toy, one_u, 3.0)
    torch.testing.assert_close(guided1(x, sigma, cond), classifier_free(toy, Cond(tokens=one_u.tokens.expand(3, -1, -1).clone()), 3.0)(x, sigma, cond))
    torch.testing.assert_close(guided1(x[:1], sigma[:1], one_c), toy(x[:1], sigma[:1], one_u) + 3.0 * (toy(x[:1], sigma[:1], one_c) - toy(x[:1], sigma[:1], one_u)), rtol=1e-6, atol=1e-5)


def test_rescale_zero_is_plain_cfg(inputs):
    x, sigma, cond, uncond = inputs
    plain = classifier_free(toy, uncond, 7.5)(x, sigma, cond)
    torch.testing.assert_close(classifier_free(toy, uncond, 7.5, rescale=0.0)(x, sigma, cond), plain, rtol=0, atol=0)


def _eps(x, x0, sigma):
    return (x - x0) / sigma.reshape(-1, 1, 1, 1)


def test_rescale_one_matches_the_conditional_eps_std(inputs):
    x, sigma, cond, uncond = inputs
    eps_c = _eps(x, toy(x, sigma, cond), sigma)
    eps_cfg = _eps(x, classifier_free(toy, uncond, 7.5)(x, sigma, cond), sigma)
    eps_r = _eps(x, classifier_free(toy, uncond, 7.5, rescale=1.0)(x, sigma, cond), sigma)
    std = lambda e: e.flatten(1).std(dim=1)  # noqa: E731
    assert not torch.allclose(std(eps_cfg), std(eps_c), rtol=1e-2)  # guidance changed the std ...
    torch.testing.assert_close(std(eps_r), std(eps_c), rtol=1e-5, atol=1e-6)  # ... and rescale=1 restores it
    # the direction is that of the guided eps (a positive per-sample multiple)
    ratio = eps_r.flatten(1) / eps_cfg.flatten(1)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=1e-5)
    assert (ratio > 0).all()


def _rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    """Lin et al. 2023, eq. 15-16, written as diffusers' ``rescale_noise_cfg`` (importing diffusers'
    pipelines costs seconds, so the five lines are restated here)."""
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


@pytest.mark.parametrize("phi", [0.3, 0.7, 1.0])
def test_rescale_matches_diffusers_formula(inputs, phi):
    x, sigma, cond, uncond = inputs
    w = 6.0
    eps_c, eps_u = _eps(x, toy(x, sigma, cond), sigma), _eps(x, toy(x, sigma, uncond), sigma)
    theirs = _rescale_noise_cfg(eps_u + w * (eps_c - eps_u), eps_c, phi)
    ours = _eps(x, classifier_free(toy, uncond, w, rescale=phi)(x, sigma, cond), sigma)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_negative_prompt_is_just_another_uncond(inputs):
    x, sigma, cond, uncond = inputs
    negative = Cond(tokens=_tokens(3, offset=1.5))
    got = classifier_free(toy, negative, 4.0)(x, sigma, cond)
    c, n = toy(x, sigma, cond), toy(x, sigma, negative)
    torch.testing.assert_close(got, n + 4.0 * (c - n), rtol=1e-6, atol=1e-5)
    assert not torch.allclose(got, classifier_free(toy, uncond, 4.0)(x, sigma, cond), atol=1e-3)


def test_cfg_needs_both_conds(inputs):
    x, sigma, cond, uncond = inputs
    with pytest.raises(ValueError):
        classifier_free(toy, None, 7.5)(x, sigma, cond)
    with pytest.raises(ValueError):
        classifier_free(toy, uncond, 7.5)(x, sigma, None)


def test_cfg_inside_a_sampler_keeps_one_call_per_step(inputs):
    _, _, cond, uncond = inputs
    sigmas = DiscreteSchedule.from_betas("scaled_linear").sigmas_for(6, "karras")
    counting = Counting(strict_batch=True)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)) * float(sigmas[0])
    out = get_sampler("euler")(classifier_free(counting, uncond, 7.5), x, sigmas, cond=cond)
    assert torch.isfinite(out).all()
    assert counting.batches == [(6, 6, 6)] * 6


# ---------------------------------------------------------------------------------- dynamic threshold


def _big(x, sigma, cond):
    """x0 with values up to +-5 (5 tanh of a wide input), sample 0 small."""
    out = 5 * torch.tanh(x)
    out[0] = 0.9 * torch.tanh(x[0])  # |x0| < 1 already
    return out


def test_dynamic_threshold_keeps_x0_in_unit_range(inputs):
    x, sigma, _, _ = inputs
    raw = _big(x, sigma, None)
    assert raw[1:].abs().max() > 4.5
    for p in (0.9, 0.995, 1.0):
        out = dynamic_threshold(_big, p)(x, sigma, None)
        assert out.abs().max() <= 1.0 + 1e-6
        # Imagen: s = percentile of |x0| per sample (at least 1); clip to s then divide
        s = torch.quantile(raw.flatten(1).abs(), p, dim=1).clamp(min=1.0).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(out, raw.clamp(-s, s) / s, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[0], raw[0], rtol=0, atol=0)  # left alone when |x0| < 1


def test_dynamic_threshold_max_value_and_identity():
    x = 0.99 * torch.tanh(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)))
    small = lambda x, s, c: x  # noqa: E731
    torch.testing.assert_close(dynamic_threshold(small)(x, torch.ones(2), None), x, rtol=0, atol=0)
    out = dynamic_threshold(lambda x, s, c: 5 * torch.tanh(10 * x), 1.0, max_value=2.0)(x, torch.ones(2), None)
    assert out.abs().max() <= 1.0 + 1e-6 and out.abs().max() >= 1.0 - 1e-6  # s = 2, clip at 2 then / 2


@pytest.mark.parametrize("p", [0.0, -0.5, 1.5])
def test_dynamic_threshold_rejects_bad_percentile(p):
    with pytest.raises(ValueError, match="percentile"):
        dynamic_threshold(toy, p)


# ------------------------------------------------------------------------- gradient guidance (Bayes)

Y, R = 1.5, 0.5
POST_MEAN, POST_VAR = Y / (1 + R**2), R**2 / (1 + R**2)  # x0 ~ N(0, 1), y = x0 + N(0, R^2)
N_POST = 100_000


def prior_denoiser(x, sigma, cond=None):
    return x / (1 + sigma.reshape(-1, *(1,) * (x.ndim - 1)) ** 2)


def noisy_loglik(x, sigma, cond=None):
    """log p(y | x_sigma) = log N(y; x / (1 + sigma^2), sigma^2 / (1 + sigma^2) + R^2) (x0 | x is Gaussian)."""
    s2 = sigma.reshape(-1, *(1,) * (x.ndim - 1)).to(x.dtype) ** 2
    var = s2 / (1 + s2) + R**2
    ll = -0.5 * (Y - x / (1 + s2)) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)
    return ll.flatten(1).sum(dim=1)


def _sample_posterior(name, n, scale, start_mean, start_var):
    sigmas = DiscreteSchedule.from_betas("scaled_linear").sigmas_for(n, "karras")
    z = NoiseSource([0], (N_POST,)).initial().reshape(N_POST, 1)
    x = start_mean + math.sqrt(start_var + float(sigmas[0]) ** 2) * z  # exact marginal at sigmas[0]
    out = get_sampler(name)(gradient_guidance(prior_denoiser, noisy_loglik, scale), x, sigmas)
    return out, float(sigmas[-2])


def _check(out, mean, var, allow):
    """se(mean) = sqrt(var/N), se(var)/var = sqrt(2/N); 5 standard errors plus a discretisation allowance."""
    m, v = out.double().mean().item(), out.double().var().item()
    return abs(m - mean) <= 5 * math.sqrt(var / out.numel()) and abs(v / var - 1) <= 5 * math.sqrt(2 / out.numel()) + allow


def test_gradient_guidance_denoiser_is_the_posterior_mean():
    """Closed form: E[x0 | x_sigma, y] = (x/sigma^2 + y/R^2) / (1 + 1/sigma^2 + 1/R^2)."""
    x = torch.linspace(-20, 20, 41).reshape(-1, 1)
    for sig in (0.05, 0.7, 3.0, 14.0):
        sigma = torch.full((41,), sig)
        got = gradient_guidance(prior_denoiser, noisy_loglik, 1.0)(x, sigma, None)
        want = (x / sig**2 + Y / R**2) / (1 + 1 / sig**2 + 1 / R**2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,n,allow", [("heun", 40, 0.02), ("euler", 300, 0.03)])
def test_gradient_guidance_samples_the_exact_posterior(name, n, allow):
    out, sl = _sample_posterior(name, n, 1.0, POST_MEAN, POST_VAR)
    target_var = POST_VAR**2 / (POST_VAR + sl**2)  # the last step returns E[x0 | x_sigma_last, y]
    assert _check(out, POST_MEAN, target_var, allow), (out.mean().item(), out.var().item(), POST_MEAN, target_var)


def test_gradient_guidance_scale_zero_is_the_prior():
    out, sl = _sample_posterior("heun", 40, 0.0, 0.0, 1.0)
    assert _check(out, 0.0, 1.0 / (1 + sl**2), 0.02), (out.mean().item(), out.var().item())
    assert not _check(out, POST_MEAN, POST_VAR**2 / (POST_VAR + sl**2), 0.02)


def test_gradient_guidance_wrong_scale_is_not_the_posterior():
    out, sl = _sample_posterior("heun", 40, 2.0, POST_MEAN, POST_VAR)
    assert not _check(out, POST_MEAN, POST_VAR**2 / (POST_VAR + sl**2), 0.02)


@pytest.mark.parametrize("weights,scale", [((1.0, 0.5), 4.0), ((0.7, -0.4, 1.2), 1.0), ((1.0,), 6.0)])
def test_composed_guidance_sums_each_parts_difference(inputs, weights, scale):
    """Composable diffusion: x0 = u + s * sum_i w_i (c_i - u), all k + 1 in one batched call; one part of
    weight 1 is plain CFG, bit for bit."""
    x, sigma, _, uncond = inputs
    parts = [Cond(tokens=_tokens(10 + i, offset=0.3 * i)) for i in range(len(weights))]
    u = toy(x, sigma, uncond)
    want = u + scale * sum(w * (toy(x, sigma, p) - u) for w, p in zip(weights, parts))
    counting = Counting()
    got = classifier_free(counting, uncond, scale, weights=weights)(x, sigma, Cond.cat(parts))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    b = x.shape[0]
    assert counting.batches == [((len(weights) + 1) * b,) * 3]
    if weights == (1.0,):
        assert torch.equal(got, classifier_free(toy, uncond, scale)(x, sigma, parts[0]))


def test_composed_guidance_needs_every_part_for_every_image(inputs):
    x, sigma, cond, uncond = inputs
    with pytest.raises(ValueError, match="2 parts needs 6 conditioning rows for a batch of 3, got 3"):
        classifier_free(toy, uncond, 3.0, weights=(1.0, 1.0))(x, sigma, cond)
