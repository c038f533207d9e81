"""Prediction types, the discrete-time Denoiser adapter, and the noise schedules (against diffusers)."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from dreamlab.core.prediction import Denoiser, Prediction, convert, from_x0, to_x0
from dreamlab.core.schedules import SPACINGS, DiscreteSchedule, karras, make_betas, truncate
from dreamlab.errors import NonFiniteError

PREDS = list(Prediction)


SCHED = DiscreteSchedule.from_betas("scaled_linear")
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _sigma(kind: str, b: int, dtype=torch.float64):
    """A scalar sigma, a 0-d tensor, or per-sample sigmas (B,) spanning 0.03 .. 15."""
    if kind == "float":
        return 2.5
    if kind == "0d":
        return torch.tensor(0.7, dtype=dtype)
    return torch.exp(torch.empty(b, dtype=dtype).uniform_(math.log(0.03), math.log(15.0), generator=_gen(7)))


# ------------------------------------------------------------------------------------ conversions


@pytest.mark.parametrize("sigma_kind", ["float", "0d", "per_sample"])
@pytest.mark.parametrize("src", PREDS, ids=lambda p: p.name)
@pytest.mark.parametrize("dst", PREDS, ids=lambda p: p.name)
def test_convert_round_trips(src, dst, sigma_kind):
    b = 5
    x = torch.randn(b, 4, 8, 8, generator=_gen(1), dtype=torch.float64) * 4
    out = torch.randn(b, 4, 8, 8, generator=_gen(2), dtype=torch.float64)
    sigma = _sigma(sigma_kind, b)
    there = convert(out, x, sigma, src, dst)
    back = convert(there, x, sigma, dst, src)
    torch.testing.assert_close(back, out, rtol=1e-5, atol=1e-5)
    # both describe the same x0
    torch.testing.assert_close(to_x0(there, x, sigma, dst), to_x0(out, x, sigma, src), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma_kind", ["float", "0d", "per_sample"])
@pytest.mark.parametrize("pred", PREDS, ids=lambda p: p.name)
def test_to_x0_inverts_from_x0_float32(pred, sigma_kind):
    b = 5
    x0 = torch.randn(b, 3, 4, 4, generator=_gen(3))
    x = x0 + torch.randn(b, 3, 4, 4, generator=_gen(4))
    sigma = _sigma(sigma_kind, b, torch.float32)
    got = to_x0(from_x0(x0, x, sigma, pred), x, sigma, pred)
    assert got.dtype == torch.float32 and got.shape == x0.shape
    torch.testing.assert_close(got, x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma_kind", ["float", "0d", "per_sample"])
def test_v_definition(sigma_kind):
    """With x = x0 + sigma eps, alpha = 1/sqrt(1+sigma^2), s = sigma/sqrt(1+sigma^2):
    v = alpha eps - s x0 (Salimans & Ho) converts to x0 and eps exactly."""
    b = 6
    x0 = torch.randn(b, 2, 3, 3, generator=_gen(5), dtype=torch.float64)
    eps = torch.randn(b, 2, 3, 3, generator=_gen(6), dtype=torch.float64)
    sigma = _sigma(sigma_kind, b)
    sg = torch.as_tensor(sigma, dtype=torch.float64)
    sg = sg.reshape(-1, 1, 1, 1) if sg.ndim else sg
    x = x0 + sg * eps
    alpha, s = 1 / (1 + sg**2).sqrt(), sg / (1 + sg**2).sqrt()
    v = alpha * eps - s * x0
    torch.testing.assert_close(to_x0(v, x, sigma, Prediction.V), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(from_x0(x0, x, sigma, Prediction.V), v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(to_x0(eps, x, sigma, Prediction.EPS), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(from_x0(x0, x, sigma, Prediction.EPS), eps, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(convert(eps, x, sigma, Prediction.EPS, Prediction.V), v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(convert(v, x, sigma, Prediction.V, Prediction.EPS), eps, rtol=1e-10, atol=1e-10)
    # and in the DDPM form x_t = alpha x0 + s eps, v = alpha eps - s x0 is the usual alpha x_t - x0 identity
    torch.testing.assert_close(alpha * (alpha * x) - s * v, x0, rtol=1e-10, atol=1e-10)


def test_prediction_values_are_diffusers_strings():
    assert {p.value for p in Prediction} == {"epsilon", "v_prediction", "sample"}
    assert Prediction("v_prediction") is Prediction.V


# ------------------------------------------------------------------------------------------ Denoiser


def _true_model(x0: torch.Tensor, pred: Prediction, schedule=SCHED, seen=None):
    """A perfect network for data that is exactly ``x0``: from (x_t, t) it recovers the noise."""

    def model(call):
        x_t, t = call.x_t, call.t
        if seen is not None:
            seen.append((x_t.clone(), t.clone()))
        frac = t.double() - t.double().floor()
        if bool((frac == 0).all()):  # integer t: the training alphas_cumprod, as the trainer sees them
            ac = schedule.alphas_cumprod.double()[t.long()]
        else:
            sig = schedule.t_to_sigma(t)
            ac = 1 / (1 + sig**2)
        ac = ac.reshape(-1, *(1,) * (x_t.ndim - 1))
        a, s = ac.sqrt(), (1 - ac).sqrt()
        eps = (x_t.double() - a * x0.double()) / s
        out = {Prediction.EPS: eps, Prediction.V: a * eps - s * x0.double(), Prediction.X0: x0.double()}[pred]
        return out.to(x_t.dtype)

    return model


@pytest.mark.parametrize("pred", PREDS, ids=lambda p: p.name)
def test_denoiser_with_a_perfect_model_returns_x0_at_training_sigmas(pred):
    ts = torch.tensor([0, 1, 17, 250, 500, 749, 998, 999])
    sigma = SCHED.sigmas[ts]
    x0 = torch.randn(len(ts), 4, 8, 8, generator=_gen(8))
    eps = torch.randn(len(ts), 4, 8, 8, generator=_gen(9))
    x = x0 + sigma.float().reshape(-1, 1, 1, 1) * eps
    seen = []
    got = Denoiser(_true_model(x0, pred, seen=seen), SCHED, pred)(x, sigma.float())
    torch.testing.assert_close(got, x0, rtol=1e-4, atol=2e-4)
    # the network saw the DDPM form x_t = x / sqrt(1 + sigma^2) at the exact integer timesteps
    x_t, t = seen[0]
    torch.testing.assert_close(t.double(), ts.double(), rtol=0, atol=1e-3)
    torch.testing.assert_close(x_t, x / (1 + sigma.float() ** 2).sqrt().reshape(-1, 1, 1, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pred", PREDS, ids=lambda p: p.name)
def test_denoiser_with_a_perfect_model_returns_x0_between_training_sigmas(pred):
    sigma = karras(9, SCHED.sigma_min, SCHED.sigma_max)[:-1]  # off the training grid
    x0 = torch.randn(len(sigma), 3, 4, 4, generator=_gen(10), dtype=torch.float64)
    x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(len(sigma), 3, 4, 4, generator=_gen(11), dtype=torch.float64)
    got = Denoiser(_true_model(x0, pred), SCHED, pred)(x, sigma)
    assert got.dtype == torch.float64
    # t is float32 inside the Denoiser: relative error of sigma(t) ~1e-6, times sigma up to 15
    torch.testing.assert_close(got, x0, rtol=1e-4, atol=1e-4)


def test_denoiser_scalar_sigma_and_model_dtype():
    x0 = torch.randn(2, 3, 4, 4, generator=_gen(12))
    sigma = float(SCHED.sigmas[300])
    x = x0 + sigma * torch.randn(2, 3, 4, 4, generator=_gen(13))
    dtypes = []

    def model(call):
        x_t, t = call.x_t, call.t
        dtypes.append(x_t.dtype)
        return _true_model(x0, Prediction.EPS)(replace(call, x_t=x_t.double())).to(x_t.dtype)

    got = Denoiser(model, SCHED, Prediction.EPS, model_dtype=torch.bfloat16)(x, torch.tensor(sigma))
    assert dtypes == [torch.bfloat16] and got.dtype == torch.float32
    torch.testing.assert_close(got, x0, rtol=0, atol=0.15)  # bfloat16 rounding of eps, times sigma ~ 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_denoiser_raises_on_non_finite_output(bad):
    x = torch.randn(2, 4, 8, 8, generator=_gen(14))

    def model(call):
        x_t, t = call.x_t, call.t
        out = torch.zeros_like(x_t)
        out[1, 2, 3, 4] = bad
        return out

    with pytest.raises(NonFiniteError) as info:
        Denoiser(model, SCHED)(x, torch.tensor([1.0, 1.0]))
    msg = str(info.value)
    assert "\n" not in msg and "NaN" in msg
    assert isinstance(info.value, FloatingPointError)
    # opting out passes the values through
    out = Denoiser(model, SCHED, check_finite=False)(x, torch.tensor([1.0, 1.0]))
    assert not torch.isfinite(out).all()


def test_denoiser_accepts_finite_half_precision_output_with_a_large_sum():
    x = torch.randn(2, 4, 64, 64, generator=_gen(16)).half()
    out = Denoiser(lambda call: torch.full_like(call.x_t, 3.0), SCHED, Prediction.X0)(x, torch.tensor([1.0, 1.0]))
    assert out.dtype == torch.float16 and bool((out == 3.0).all())


def test_denoiser_finite_check_in_half_precision_still_catches_nan():
    x = torch.randn(2, 4, 8, 8, generator=_gen(17)).half()

    def model(call):
        x_t, t = call.x_t, call.t
        out = torch.zeros_like(x_t)
        out[0, 0, 0, 0] = float("nan")
        return out

    with pytest.raises(NonFiniteError):
        Denoiser(model, SCHED)(x, torch.tensor([1.0, 1.0]))


# --------------------------------------------------------------------------------- sigma <-> t


def test_sigma_to_t_inverts_t_to_sigma_at_integer_t():
    t = torch.arange(1000, dtype=torch.float64)
    # exp(log(sigma)) is not bit-exact: equal up to float64 rounding
    torch.testing.assert_close(SCHED.sigma_to_t(SCHED.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    torch.testing.assert_close(SCHED.t_to_sigma(t), SCHED.sigmas, rtol=1e-12, atol=0)
    assert torch.equal(SCHED.sigma_to_t(SCHED.sigmas), t)  # exact at the training sigmas
    assert torch.equal(SCHED.sigma_to_t(SCHED.sigmas.float()).round(), t.float())


def test_sigma_to_t_inverts_t_to_sigma_at_fractional_t():
    t = torch.cat([torch.rand(500, generator=_gen(15), dtype=torch.float64) * 999, torch.tensor([0.5, 998.5, 998.999, 0.001])])
    torch.testing.assert_close(SCHED.sigma_to_t(SCHED.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    # float32 sigmas (as the Denoiser passes them) still land within 1e-3 of a step
    torch.testing.assert_close(SCHED.sigma_to_t(SCHED.t_to_sigma(t).float()).double(), t, rtol=0, atol=1e-3)


def test_t_to_sigma_interpolates_log_sigma():
    lo, hi = SCHED.sigmas[10], SCHED.sigmas[11]
    got = SCHED.t_to_sigma(torch.tensor([10.25], dtype=torch.float64))
    torch.testing.assert_close(got, torch.exp(0.75 * lo.log() + 0.25 * hi.log()).reshape(1))


def test_sigma_to_t_clamps_out_of_range():
    t = SCHED.sigma_to_t(torch.tensor([1e-6, 0.0, SCHED.sigma_max * 3], dtype=torch.float64))
    assert t.tolist() == [0.0, 0.0, 999.0]


# ------------------------------------------------------------------------------------- schedules


BETA_CASES = [
    ("linear", "linear", 1e-4, 0.02),
    ("linear", "linear", 0.00085, 0.012),
    ("scaled_linear", "scaled_linear", 0.00085, 0.012),
    ("cosine", "squaredcos_cap_v2", 1e-4, 0.02),
]


@pytest.mark.parametrize("T", [1000, 500])
@pytest.mark.parametrize("ours,theirs,start,end", BETA_CASES, ids=[f"{c[0]}-{c[2]}" for c in BETA_CASES])
def test_betas_and_alphas_cumprod_equal_diffusers(ours, theirs, start, end, T):
    d = DDPMScheduler(beta_schedule=theirs, beta_start=start, beta_end=end, num_train_timesteps=T)
    betas = make_betas(ours, T, start, end)
    assert betas.dtype == torch.float32
    assert torch.equal(betas, d.betas)
    sched = DiscreteSchedule.from_betas(ours, T, start, end)
    assert torch.equal(sched.alphas_cumprod, d.alphas_cumprod)
    assert sched.num_train_timesteps == T
    assert torch.equal(DiscreteSchedule.from_diffusers_config(dict(d.config)).alphas_cumprod, d.alphas_cumprod)


def test_unknown_beta_schedule_rejected():
    with pytest.raises(ValueError, match="beta schedule"):
        make_betas("quadratic")
    with pytest.raises(ValueError, match="beta_schedule"):
        DiscreteSchedule.from_diffusers_config({"beta_schedule": "sigmoid"})


def test_sigmas_are_the_ddpm_noise_levels():
    ac = SCHED.alphas_cumprod.double()
    torch.testing.assert_close(SCHED.sigmas, ((1 - ac) / ac).sqrt(), rtol=0, atol=0)
    assert SCHED.sigma_min == pytest.approx(0.0292, abs=1e-4) and SCHED.sigma_max == pytest.approx(14.61, abs=1e-2)


@pytest.mark.parametrize("n", [2, 7, 20, 33, 50])
def test_karras_equals_diffusers(n):
    d = EulerDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True, timestep_spacing="linspace")
    d.set_timesteps(n)
    ours = karras(n, SCHED.sigma_min, SCHED.sigma_max)
    assert ours.dtype == torch.float64 and ours.shape == (n + 1,) and ours[-1] == 0
    torch.testing.assert_close(ours.float(), d.sigmas, rtol=1e-6, atol=0)  # diffusers keeps float32
    torch.testing.assert_close(SCHED.sigmas_for(n, "karras"), ours, rtol=0, atol=0)


def test_karras_rho_and_validation():
    sig = karras(4, 0.1, 10.0, rho=1.0)  # rho = 1 is linear in sigma
    torch.testing.assert_close(sig, torch.tensor([10.0, 6.7, 3.4, 0.1, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        karras(5, 10.0, 0.1)
    with pytest.raises(ValueError):
        karras(5, 0.0, 1.0)


TIMESTEP_NS = [1, 2, 7, 10, 20, 25, 30, 33, 50, 100, 250, 999, 1000]
# linspace with n = 1 is left out: diffusers gives [0] (a one-step "sampler" that starts at the least noise),
# dreamlab [999]; dreamlab's is the useful one, but it is a deviation from the documented parity.


@pytest.mark.parametrize("n", TIMESTEP_NS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_equal_diffusers_ddim(spacing, n):
    if spacing == "linspace" and n == 1:
        pytest.skip("one linspace step: diffusers gives t = 0, dreamlab t = 999 (starts from noise); not asserted")
    d = DDIMScheduler(**SD_BETAS, timestep_spacing=spacing)
    d.set_timesteps(n)
    ours = SCHED.timesteps(n, spacing)
    assert torch.equal(ours.long(), d.timesteps.long()), (ours.long()[ours.long() != d.timesteps], d.timesteps)
    assert torch.equal(ours, ours.round())  # integers


@pytest.mark.parametrize("steps_offset", [0, 1])
def test_leading_steps_offset(steps_offset):
    d = DDIMScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=steps_offset)
    d.set_timesteps(50)
    assert torch.equal(SCHED.timesteps(50, "leading", steps_offset).long(), d.timesteps.long())


@pytest.mark.parametrize("spacing,n", [("trailing", 48), ("trailing", 96), ("linspace", 103)])
def test_timesteps_equal_diffusers_at_rounding_ties(spacing, n):
    d = DDIMScheduler(**SD_BETAS, timestep_spacing=spacing)
    d.set_timesteps(n)
    assert torch.equal(SCHED.timesteps(n, spacing).long(), d.timesteps.long())


def _grid_ok(sigmas: torch.Tensor, n: int) -> bool:
    return sigmas.shape == (n + 1,) and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [1, 2, 7, 20, 33, 50, 1000])
def test_sigmas_for_is_a_descending_grid_of_n_steps(spacing, n):
    sigmas = SCHED.sigmas_for(n, spacing)
    assert sigmas.dtype == torch.float64
    assert _grid_ok(sigmas, n), sigmas
    assert float(sigmas[0]) == pytest.approx(SCHED.sigma_max, rel=1e-9) or spacing == "leading"
    assert sigmas[:-1].min() >= SCHED.sigma_min * (1 - 1e-9)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "karras"])
def test_sigmas_for_every_n_up_to_1000(spacing):
    bad = [n for n in range(1, 1001) if not _grid_ok(SCHED.sigmas_for(n, spacing), n)]
    assert bad == []


@pytest.mark.parametrize("n", [61, 103])
def test_trailing_grid_has_n_steps(n):
    sigmas = SCHED.sigmas_for(n, "trailing")
    assert _grid_ok(sigmas, n), (sigmas.shape, sigmas[-4:])


def test_trailing_grid_has_n_steps_for_every_n():
    bad = [n for n in range(1, 1001) if not _grid_ok(SCHED.sigmas_for(n, "trailing"), n)]
    assert bad == []


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [0, -3])
def test_sigmas_for_rejects_non_positive_steps(spacing, n):
    with pytest.raises(ValueError, match="steps"):
        SCHED.sigmas_for(n, spacing)


def test_sigmas_for_rejects_bad_input():
    with pytest.raises(ValueError, match="steps"):
        SCHED.sigmas_for(1001, "trailing")
    with pytest.raises(ValueError, match="steps"):
        SCHED.sigmas_for(2.5, "karras")
    with pytest.raises(ValueError, match="spacing"):
        SCHED.sigmas_for(10, "exponential")


# ------------------------------------------------------------------------------------- truncate


def _diffusers_get_timesteps():
    """diffusers' StableDiffusionImg2ImgPipeline.get_timesteps, compiled from the installed diffusers' source
    without importing the pipeline module (which pulls in transformers and costs seconds)."""
    import ast
    import importlib.util
    from pathlib import Path

    root = Path(importlib.util.find_spec("diffusers").origin).parent
    src = (root / "pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py").read_text()
    cls = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "StableDiffusionImg2ImgPipeline")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "get_timesteps")
    namespace: dict = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "get_timesteps", "exec"), namespace)
    return namespace["get_timesteps"]


GET_TIMESTEPS = _diffusers_get_timesteps()


def _diffusers_img2img_kept(n: int, strength: float) -> int:
    d = DDIMScheduler(**SD_BETAS, timestep_spacing="trailing")
    d.set_timesteps(n)
    timesteps, k = GET_TIMESTEPS(SimpleNamespace(scheduler=d), n, strength, "cpu")
    assert len(timesteps) == k
    return k


@pytest.mark.parametrize("n", [7, 20, 50])
@pytest.mark.parametrize("strength", [0.0, 0.05, 0.29, 0.3, 0.5, 0.7, 0.75, 0.999, 1.0])
def test_truncate_keeps_int_n_strength_steps(n, strength):
    sigmas = SCHED.sigmas_for(n, "trailing")
    kept = truncate(sigmas, strength)
    k = _diffusers_img2img_kept(n, strength)
    assert kept.shape == (k + 1,)
    assert torch.equal(kept, sigmas[n - k :])  # the tail of the grid, ending in 0
    assert kept[-1] == 0


def test_truncate_examples():
    sigmas = SCHED.sigmas_for(20, "trailing")
    assert truncate(sigmas, 0.0).tolist() == [0.0]
    assert torch.equal(truncate(sigmas, 1.0), sigmas)
    assert torch.equal(truncate(sigmas, 0.3), sigmas[14:]) and len(truncate(sigmas, 0.3)) == 7


def test_truncate_keeps_the_timesteps_diffusers_img2img_keeps():
    for n in (20, 33):
        d = DDIMScheduler(**SD_BETAS, timestep_spacing="trailing")
        d.set_timesteps(n)
        sigmas = SCHED.sigmas_for(n, "trailing")
        for strength in (0.0, 0.3, 0.55, 1.0):
            timesteps, k = GET_TIMESTEPS(SimpleNamespace(scheduler=d), n, strength, "cpu")
            kept = truncate(sigmas, strength)
            assert len(kept) - 1 == k == len(timesteps)
            torch.testing.assert_close(kept[:-1], SCHED.sigmas[timesteps.long()], rtol=0, atol=0)


@pytest.mark.parametrize("strength", [-0.1, 1.01, float("nan")])
def test_truncate_rejects_strength_outside_unit_interval(strength):
    with pytest.raises(ValueError, match="strength"):
        truncate(SCHED.sigmas_for(10, "trailing"), strength)
