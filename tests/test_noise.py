"""Reproducible noise: sample i of a batch with seed s is bit-identical to a batch of one with seed s + i."""

from __future__ import annotations

import math

import pytest
import torch

from dreamlab.core.noise import MAX_SEED, NoiseSource, stream_seed
from dreamlab.core.samplers import STOCHASTIC, get_sampler
from dreamlab.core.schedules import DiscreteSchedule

SHAPE = (4, 8, 8)
MU, S = 0.3, 0.6


def gaussian_denoiser(x, sigma, cond=None):
    """Exact denoiser of x0 ~ N(MU, S^2): per sample, elementwise."""
    sg = sigma.reshape(-1, *(1,) * (x.ndim - 1)).to(x.dtype)
    return MU + S**2 / (S**2 + sg**2) * (x - MU)


def _run(name, seed, batch, sigmas, **opts):
    noise = NoiseSource.for_batch(seed, batch, SHAPE)
    x = noise.initial() * math.sqrt(1 + float(sigmas[0]) ** 2)
    return get_sampler(name)(gaussian_denoiser, x, sigmas, noise=noise, **opts)


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
@pytest.mark.parametrize(
    "name,opts",
    [("euler_ancestral", {}), ("dpmpp_2m_sde", {}), ("ddpm", {}), ("ddim", {"eta": 0.5})],
    ids=["euler_ancestral", "dpmpp_2m_sde", "ddpm", "ddim-eta0.5"],
)
def test_sample_i_of_a_batch_equals_seed_plus_i_alone(name, opts, spacing):
    sigmas = DiscreteSchedule.from_betas("scaled_linear").sigmas_for(20, spacing)
    batch = _run(name, 5, 4, sigmas, **opts)
    for i in range(4):
        alone = _run(name, 5 + i, 1, sigmas, **opts)
        assert torch.equal(batch[i : i + 1], alone), (name, i)
    assert not torch.equal(batch[0], batch[1])


def test_stochastic_samplers_use_the_step_noise():
    """The same initial noise but different step noise must give a different result (noise is used)."""
    sigmas = DiscreteSchedule.from_betas("scaled_linear").sigmas_for(10, "karras")
    x = NoiseSource([1], SHAPE).initial() * 15
    for name in ("euler_ancestral", "dpmpp_2m_sde", "ddpm"):
        assert name in STOCHASTIC
        a = get_sampler(name)(gaussian_denoiser, x, sigmas, noise=NoiseSource([1], SHAPE))
        b = get_sampler(name)(gaussian_denoiser, x, sigmas, noise=NoiseSource([2], SHAPE))
        c = get_sampler(name)(gaussian_denoiser, x, sigmas, noise=NoiseSource([1], SHAPE))
        assert not torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("seed", [0, 1, 5, 12345, 2**32 + 7, MAX_SEED])
def test_initial_noise_is_torch_randn_with_the_seed(seed):
    got = NoiseSource([seed], SHAPE).initial()
    want = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(got, want)


def test_batch_initial_noise_rows_are_the_per_seed_noise():
    got = NoiseSource.for_batch(7, 3, SHAPE).initial()
    assert got.shape == (3, *SHAPE)
    for i in range(3):
        assert torch.equal(got[i], torch.randn(SHAPE, generator=torch.Generator().manual_seed(7 + i)))


def test_step_noise_differs_between_steps_and_is_reproducible():
    ns = NoiseSource.for_batch(3, 2, SHAPE)
    draws = [ns.initial()] + [ns(k) for k in range(6)]
    for i in range(len(draws)):
        for j in range(i + 1, len(draws)):
            assert not torch.equal(draws[i], draws[j]), (i, j)
    assert torch.equal(ns(4), NoiseSource.for_batch(3, 2, SHAPE)(4))  # stateless: same (seed, step), same noise
    assert torch.equal(ns(4)[1], NoiseSource([4], SHAPE)(4)[0])  # and independent of the batch


def test_step_noise_is_standard_normal_and_uncorrelated():
    ns = NoiseSource.for_batch(0, 8, (64, 64))
    draws = torch.stack([ns(k) for k in range(4)]).double()  # 4 steps x 8 samples x 4096
    n = draws[0].numel()
    for d in draws:
        assert abs(d.mean().item()) < 5 / math.sqrt(n) and abs(d.var().item() - 1) < 5 * math.sqrt(2 / n)
    flat = draws.reshape(4, -1)
    corr = torch.corrcoef(flat)
    off = corr[~torch.eye(4, dtype=torch.bool)]
    assert off.abs().max() < 5 / math.sqrt(n)
    # neighbouring seeds are not correlated either (the stream seeds are mixed)
    rows = draws[0].reshape(8, -1)
    c = torch.corrcoef(rows)[~torch.eye(8, dtype=torch.bool)]
    assert c.abs().max() < 5 / math.sqrt(rows.shape[1])


def test_stream_seeds_are_distinct_and_in_range():
    seen = set()
    for seed in (0, 1, 2, MAX_SEED):
        for stream in range(50):
            s = stream_seed(seed, stream)
            assert 0 <= s <= MAX_SEED
            seen.add(s)
    assert len(seen) == 4 * 50
    assert stream_seed(42, 0) == 42


@pytest.mark.parametrize("bad", [-1, 2**63, 2**64, 1.0, "3"])
def test_seed_outside_range_raises(bad):
    with pytest.raises(ValueError, match="seed"):
        NoiseSource([bad], SHAPE)


def test_for_batch_overflow_raises_and_max_seed_is_allowed():
    with pytest.raises(ValueError):
        NoiseSource.for_batch(MAX_SEED, 2, SHAPE)
    with pytest.raises(ValueError):
        NoiseSource.for_batch(-1, 1, SHAPE)
    assert NoiseSource.for_batch(MAX_SEED, 1, SHAPE).initial().shape == (1, *SHAPE)
    assert NoiseSource.for_batch(MAX_SEED - 3, 4, SHAPE).seeds[-1] == MAX_SEED


def test_dtype_is_applied_after_drawing_in_float32():
    a = NoiseSource([9], SHAPE, dtype=torch.float16)(2)
    b = NoiseSource([9], SHAPE)(2)
    assert a.dtype == torch.float16 and torch.equal(a, b.half())
