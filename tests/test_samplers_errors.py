"""Errors a user can act on: unknown sampler names, bad options, bad grids."""

from __future__ import annotations

import pytest
import torch

from dreamlab.core.samplers import SAMPLERS, get_sampler
from dreamlab.errors import DreamlabError, UnknownNameError


def _identity_denoiser(x, sigma, cond=None):
    return torch.zeros_like(x)


def test_unknown_sampler_lists_the_known_names_in_one_line():
    with pytest.raises(UnknownNameError) as info:
        get_sampler("nope")
    msg = str(info.value)
    assert "\n" not in msg
    assert "nope" in msg
    for name in ("euler", "dpmpp_2m", "heun", "ddim"):
        assert name in msg
    assert all(name in msg for name in SAMPLERS)
    assert not msg.startswith(("'", '"'))  # not KeyError's quoted repr
    # catchable as the project's base error and as a KeyError
    assert isinstance(info.value, DreamlabError) and isinstance(info.value, KeyError)


def test_get_sampler_returns_the_registered_function():
    for name, fn in SAMPLERS.items():
        assert get_sampler(name) is fn


@pytest.mark.parametrize("eta", [-0.1, -1.0])
def test_ddim_rejects_negative_eta(eta):
    sigmas = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="eta"):
        get_sampler("ddim")(_identity_denoiser, torch.randn(1, 4), sigmas, eta=eta)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("sigmas", [torch.zeros(2, 3), torch.zeros(0)], ids=["2d", "empty"])
def test_samplers_reject_a_malformed_grid(name, sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        get_sampler(name)(_identity_denoiser, torch.randn(1, 4), sigmas)
