"""Parity with diffusers' schedulers: the same tiny random UNet, the same initial noise and the same
per-step noise give the same final sample (within 1e-4).

Corresponding settings (T = 1000 training steps, n divides T):
    dreamlab ddim(eta)        <-> DDIMScheduler(eta, set_alpha_to_one=True, clip_sample=False), same spacing
    dreamlab ddpm             <-> DDPMScheduler(variance_type="fixed_small", clip_sample=False)
    dreamlab euler            <-> EulerDiscreteScheduler (same spacing; karras <-> use_karras_sigmas with linspace)
    dreamlab euler_ancestral  <-> EulerAncestralDiscreteScheduler
    dreamlab heun             <-> HeunDiscreteScheduler
    dreamlab dpmpp_2m         <-> DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)
    dreamlab dpmpp_2m_sde     <-> DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
Spacing names are diffusers' ``timestep_spacing``. VP schedulers (DDPM, DDIM, DPM-Solver) hold x_t; the
dreamlab state is x_t * sqrt(1 + sigma^2), equal at sigma = 0.
"""

import inspect
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from dreamlab.core.prediction import Denoiser, Prediction
from dreamlab.core.samplers import get_sampler
from dreamlab.core.schedules import DiscreteSchedule
from dreamlab.core.types import Cond

BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
N = 20
SHAPE = (2, 4, 8, 8)


def _diffusers_run(sched, unet, tokens, z, seed, **step_kw):
    g = torch.Generator().manual_seed(seed)
    kw = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}
    kw.update(step_kw)
    x = z * sched.init_noise_sigma
    for t in sched.timesteps:
        out = unet(sched.scale_model_input(x, t), t, encoder_hidden_states=tokens).sample
        x = sched.step(out, t, x, **kw).prev_sample
    return x


def _dreamlab_run(name, unet, tokens, x, sigmas, seed, prediction, **opts):
    g = torch.Generator().manual_seed(seed)
    denoise = Denoiser(
        lambda call: unet(call.x_t, call.t, encoder_hidden_states=call.cond.tokens).sample,
        DiscreteSchedule.from_betas("scaled_linear"),
        prediction,
    )
    noise = lambda i: torch.randn(x.shape, generator=g)  # same order as diffusers' generator draws
    return get_sampler(name)(denoise, x, sigmas, cond=Cond(tokens=tokens), noise=noise, **opts)


CASES = [
    # name, diffusers scheduler, spacing, VP state?, options, prediction
    ("ddim", lambda p: DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=True, prediction_type=p, timestep_spacing="trailing"), "trailing", True, {}, "epsilon"),
    ("ddim", lambda p: DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=True, prediction_type=p, timestep_spacing="leading"), "leading", True, {}, "v_prediction"),
    ("ddpm", lambda p: DDPMScheduler(**BETAS, clip_sample=False, variance_type="fixed_small", prediction_type=p, timestep_spacing="leading"), "leading", True, {}, "epsilon"),
    ("ddpm", lambda p: DDPMScheduler(**BETAS, clip_sample=False, variance_type="fixed_small", prediction_type=p, timestep_spacing="trailing"), "trailing", True, {}, "v_prediction"),
    ("euler", lambda p: EulerDiscreteScheduler(**BETAS, prediction_type=p, timestep_spacing="trailing"), "trailing", False, {}, "epsilon"),
    ("euler", lambda p: EulerDiscreteScheduler(**BETAS, prediction_type=p, timestep_spacing="leading"), "leading", False, {}, "v_prediction"),
    ("euler", lambda p: EulerDiscreteScheduler(**BETAS, prediction_type=p, timestep_spacing="linspace", use_karras_sigmas=True), "karras", False, {}, "epsilon"),
    ("euler_ancestral", lambda p: EulerAncestralDiscreteScheduler(**BETAS, prediction_type=p, timestep_spacing="trailing"), "trailing", False, {}, "epsilon"),
    ("heun", lambda p: HeunDiscreteScheduler(**BETAS, prediction_type=p, timestep_spacing="trailing"), "trailing", False, {}, "epsilon"),
    ("heun", lambda p: HeunDiscreteScheduler(**BETAS, prediction_type=p, timestep_spacing="leading"), "leading", False, {}, "v_prediction"),
    ("dpmpp_2m", lambda p: DPMSolverMultistepScheduler(**BETAS, prediction_type=p, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"), "trailing", True, {}, "epsilon"),
    ("dpmpp_2m", lambda p: DPMSolverMultistepScheduler(**BETAS, prediction_type=p, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"), "trailing", True, {}, "v_prediction"),
    ("dpmpp_2m_sde", lambda p: DPMSolverMultistepScheduler(**BETAS, prediction_type=p, algorithm_type="sde-dpmsolver++", solver_order=2, timestep_spacing="trailing"), "trailing", True, {}, "epsilon"),
    ("ddim", lambda p: DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=True, prediction_type=p, timestep_spacing="trailing"), "trailing", True, {"eta": 0.5}, "epsilon"),
]


@pytest.mark.parametrize("name,make,spacing,vp,opts,pred", CASES, ids=[f"{c[0]}-{c[2]}-{c[5]}{'-' + str(c[4]) if c[4] else ''}" for c in CASES])
def test_matches_diffusers(tiny_unet, name, make, spacing, vp, opts, pred):
    sched = make(pred)
    sched.set_timesteps(N)
    schedule = DiscreteSchedule.from_betas("scaled_linear")
    sigmas = schedule.sigmas_for(N, spacing)

    # Same noise levels: VE schedulers expose sigmas; VP ones expose timesteps.
    if vp:
        assert torch.equal(schedule.timesteps(N, spacing).long(), sched.timesteps.long()) if spacing != "karras" else True
    else:
        theirs = sched.sigmas.double()
        if name == "heun":  # heun repeats the interior sigmas for its second evaluation
            theirs = torch.cat([theirs[:1], theirs[1::2]])
        torch.testing.assert_close(sigmas.float(), theirs.float(), rtol=1e-5, atol=1e-6)

    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    tokens = torch.randn(SHAPE[0], 5, 16, generator=torch.Generator().manual_seed(2))
    theirs = _diffusers_run(sched, tiny_unet, tokens, z, seed=3, **opts)

    sigma0 = float(sigmas[0])
    x_init = z * math.sqrt(1 + sigma0**2) if vp else z * float(sched.init_noise_sigma)
    ours = _dreamlab_run(name, tiny_unet, tokens, x_init, sigmas, 3, Prediction(pred), **opts)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
