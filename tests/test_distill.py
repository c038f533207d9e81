"""Few-step students (docs/distillation.md): the consistency sampler on the Gaussian toy and against
diffusers' LCMScheduler, folded guidance (one row per step, composed prompts, what a student cannot do),
the distillation losses on a tiny model, exported students through generate, and resumable runs."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from dreamlab.core.guiders import CFG, FoldedCFG, guide
from dreamlab.core.noise import NoiseSource
from dreamlab.core.prediction import Denoiser, Prediction, consistency_scalings
from dreamlab.core.samplers import get_sampler, keeps_steps
from dreamlab.core.schedules import DiscreteSchedule
from dreamlab.core.types import Cond, ModelCall
from dreamlab.errors import DreamlabError, InvalidRequestError
from dreamlab.generate import encode_image, generate, make_request
from dreamlab.loading.model import load_model
from dreamlab.models.unet import UNetModelFn, guidance_embedding
from dreamlab.settings import DistillConfig
from dreamlab.train import distill
from test_gaussian_toy import B, DIM, MU, S, SCHEDULE, discretisation_var, gaussian_denoiser, initial_state, moments_ok

# --------------------------------------------------------------------------------- the consistency sampler


def consistency_function(s: float = S, mu: float = MU):
    """The exact consistency function of the toy: the probability-flow ODE carries N(mu, s^2 + sigma^2) to
    N(mu, s^2) by scaling about mu, so f(x, sigma) = mu + s / sqrt(s^2 + sigma^2) (x - mu)."""

    def f(x, sigma, cond=None):
        sg = sigma.reshape(-1, *(1,) * (x.ndim - 1)).to(x.dtype)
        return mu + s / (s**2 + sg**2).sqrt() * (x - mu)

    return f


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_lcm_with_the_exact_consistency_function_samples_the_data(n, spacing):
    """Every step of multistep consistency sampling is exact on the toy, so any grid gives x0 ~ N(MU, S^2):
    the sampled moments match, and the discretisation's exact variance is S^2 (no discretisation error)."""
    sigmas = SCHEDULE.sigmas_for(n, spacing)
    out = get_sampler("lcm")(consistency_function(), initial_state(sigmas), sigmas, noise=NoiseSource.for_batch(7, B, (DIM,)))
    assert moments_ok(out, MU, S**2, 0.0), (out.mean().item(), out.var().item())
    assert discretisation_var(get_sampler("lcm"), {}, sigmas, consistency_function()) == pytest.approx(S**2, rel=1e-9)


def test_lcm_needs_a_consistency_function_and_its_noise():
    """The moment check discriminates: with the posterior mean E[x0 | x] (a plain denoiser) the samples are
    too narrow, and so they are without the fresh noise of each step."""
    sigmas = SCHEDULE.sigmas_for(4, "trailing")
    x = initial_state(sigmas)
    narrow = get_sampler("lcm")(gaussian_denoiser(), x, sigmas, noise=NoiseSource.for_batch(7, B, (DIM,)))
    assert not moments_ok(narrow, MU, S**2, 0.05)
    quiet = get_sampler("lcm")(consistency_function(), x, sigmas, noise=lambda i: torch.zeros_like(x))
    assert not moments_ok(quiet, MU, S**2, 0.05)


def test_lcm_is_euler_ancestral_with_all_the_noise_fresh_and_one_call_per_step():
    sigmas = SCHEDULE.sigmas_for(6, "trailing")
    x = initial_state(sigmas)[:4]
    calls, infos = [], []

    def counting(x_, sigma, cond=None):
        calls.append(float(sigma[0]))
        return consistency_function()(x_, sigma)

    ns = lambda: NoiseSource.for_batch(3, 4, (DIM,))  # noqa: E731
    a = get_sampler("lcm")(counting, x, sigmas, noise=ns(), on_step=infos.append)
    b = get_sampler("euler_ancestral")(consistency_function(), x, sigmas, noise=ns(), eta=1e9)
    assert torch.equal(a, b)
    assert calls == pytest.approx(sigmas[:-1].tolist(), rel=1e-6) and [i.i for i in infos] == list(range(6))
    assert keeps_steps("lcm") and not keeps_steps("ddim")


def test_lcm_with_the_boundary_condition_matches_diffusers_lcm_scheduler():
    """A fixed eps network through Denoiser(consistency=True) and ``lcm`` against LCMScheduler on the same
    timesteps and noise: the engine's consistency sampling is LCM's (to float32 rounding)."""
    from diffusers import LCMScheduler

    sched = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(4)
    ts = sched.timesteps.long()
    schedule = DiscreteSchedule.from_betas("scaled_linear")

    def eps_net(call):  # any smooth function of (x_t, t) will do
        return 0.3 * call.x_t * torch.cos(call.t.float() / 700).reshape(-1, 1, 1, 1) + 0.1

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(42)  # LCMScheduler draws each step's noise from it, in order
    sample = latents
    for t in ts:
        call = ModelCall(sample, t.expand(2).float())
        sample = sched.step(eps_net(call), t, sample, generator=gen).prev_sample
    same = torch.Generator().manual_seed(42)
    sigmas = torch.cat([schedule.sigmas[ts], torch.zeros(1, dtype=torch.float64)])
    x = latents * math.sqrt(1 + float(sigmas[0]) ** 2)
    ours = get_sampler("lcm")(Denoiser(eps_net, schedule, Prediction.EPS, consistency=True), x, sigmas,
                              noise=lambda i: torch.randn(2, 4, 8, 8, generator=same))
    torch.testing.assert_close(ours, sample, rtol=1e-4, atol=1e-4)


def test_boundary_condition():
    c_skip, c_out = consistency_scalings(torch.tensor([0.0, 1.0, 20.0, 999.0]))
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x
    assert (c_skip[1:] < 0.0025).all() and (c_out[1:] > 0.998).all()  # the network's x0 from t = 1 on


def test_img2img_grid_keeps_the_steps_below_the_strength():
    s = SCHEDULE
    full = s.sigmas_for(4, "trailing")
    assert torch.equal(s.sigmas_below(4, "trailing", 1.0), full)
    half = s.sigmas_below(4, "trailing", 0.5)
    assert len(half) == 5 and float(half[0]) == pytest.approx(float(s.t_to_sigma(torch.tensor(499.0))))
    assert float(half[0]) == pytest.approx(float(full[2]), rel=1e-9)  # starts where truncate(full, 0.5) does
    low = s.sigmas_below(4, "karras", 0.2)
    assert len(low) == 5 and float(low[0]) == pytest.approx(float(s.t_to_sigma(torch.tensor(199.0))))
    assert torch.equal(s.sigmas_below(4, "trailing", 0.0), torch.zeros(1, dtype=torch.float64))
    assert (half[:-1].diff() < 0).all()


# ------------------------------------------------------------------------------------------ folded guidance


def test_guidance_embedding_matches_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    scale = torch.tensor([1.0, 2.5, 8.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, scale - 1, embedding_dim=32)
    torch.testing.assert_close(guidance_embedding(scale, 32), ref)


def _affine_models():
    """A teacher D(x, c) = 0.3 x + c (c the prompt's token value) and its exact folded student
    G(x, c, s) = D_u + s (D_c - D_u), u the empty prompt (token value 0.1)."""
    u = 0.1

    def teacher(x, sigma, cond):
        return 0.3 * x + cond.tokens.reshape(-1, 1, 1, 1)

    def student(x, sigma, cond):
        g = cond.guidance.reshape(-1, 1, 1, 1)
        return 0.3 * x + u + g * (cond.tokens.reshape(-1, 1, 1, 1) - u)

    return u, teacher, student


@pytest.mark.parametrize("weights", [(1.0,), (1.0, 0.5), (0.7, 0.3), (1.0, -0.5, 0.25)])
def test_folded_guidance_is_the_teachers_composed_cfg(weights):
    """sum_i w_i G(c_i, s) + (1 - sum_i w_i) G(u, s) is the teacher's composed CFG exactly, with one row per
    part and an empty-prompt row only when the weights do not sum to 1."""
    u, teacher, student = _affine_models()
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    k = len(weights)
    parts = torch.arange(1, 2 * k + 1, dtype=torch.float32).reshape(k * 2, 1, 1) / 3  # part-major, 2 images
    empty = Cond(tokens=torch.full((1, 1, 1), u))
    rows = []

    def counting(x_, sigma, cond):
        rows.append(x_.shape[0])
        return student(x_, sigma, cond)

    folded = guide(counting, FoldedCFG(4.0, weights, replace(empty, guidance=torch.ones(1))))
    got = folded(x, torch.ones(2), Cond(tokens=parts, guidance=torch.ones(2 * k)))
    want = guide(teacher, CFG(empty, 4.0, weights, _composed=True))(x, torch.ones(2), Cond(tokens=parts))
    torch.testing.assert_close(got, want)
    assert rows == [2 * k + 2 * (abs(sum(weights) - 1) > 1e-9)]


# --------------------------------------------------------------------------------- students of a tiny model


@pytest.fixture(scope="module")
def teacher_unet():
    from dreamlab.models.tiny import tiny_unet

    return tiny_unet(seed=3).eval().requires_grad_(False)


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)
    cond = Cond(tokens=torch.randn(n, 5, 16, generator=g), mask=torch.ones(n, 5, dtype=torch.long))
    empty = Cond(tokens=torch.zeros(n, 5, 16), mask=torch.ones(n, 5, dtype=torch.long))
    return x0, noise, cond, empty, 1 + 7 * torch.rand(n, generator=g)


def _denoiser(unet, consistency=False):
    return Denoiser(UNetModelFn(unet, use_mask=True), SCHEDULE, Prediction.EPS, consistency=consistency)


def test_a_zero_init_student_equals_its_teacher_at_every_scale(teacher_unet):
    student = distill.student_from(teacher_unet, 8).eval()
    x0, noise, cond, _, w = _batch()
    sigma = SCHEDULE.sigmas[torch.tensor([10, 200, 600, 999])].float()
    x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    with torch.no_grad():
        want = _denoiser(teacher_unet)(x, sigma, cond)
        for scale in (w, torch.ones(4), torch.full((4,), 8.0)):
            assert torch.equal(_denoiser(student)(x, sigma, replace(cond, guidance=scale)), want)
        # through LCM's boundary condition it is the teacher too, from t = 1 on (c_skip < 0.25%)
        torch.testing.assert_close(_denoiser(student, True)(x, sigma, replace(cond, guidance=w)), want, rtol=0, atol=2e-3)
    with pytest.raises(DreamlabError, match="guidance scale as an input"):
        _denoiser(student)(x, sigma, cond)  # a student called without its scale: one line, not a silent w


def _falls(loss_fn, unet, steps=6, lr=1e-4):
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_consistency_distillation_moves_the_student_towards_its_target(teacher_unet):
    """The guided LCD loss on a fixed batch (target network held fixed) falls: the student moves towards
    the target network's output after the teacher's CFG solver step."""
    unet = distill.student_from(teacher_unet, 8).train()
    target = distill.student_from(teacher_unet, 8).eval().requires_grad_(False)
    x0, noise, cond, empty, w = _batch()
    t = torch.tensor([30, 250, 600, 990])
    losses = _falls(lambda: distill.consistency_loss(_denoiser(unet, True), _denoiser(target, True), _denoiser(teacher_unet),
                                                     x0, noise, t, cond, empty, w, 20, 0.001), unet)
    assert losses[-1] < 0.7 * losses[0], losses


def test_guided_distillation_moves_the_student_towards_the_teachers_cfg(teacher_unet):
    unet = distill.student_from(teacher_unet, 8).train()
    x0, noise, cond, empty, w = _batch()
    t = torch.tensor([30, 250, 600, 990])
    losses = _falls(lambda: distill.guided_loss(_denoiser(unet), _denoiser(teacher_unet), x0, noise, t, cond, empty, w), unet)
    assert losses[0] > 0 and losses[-1] < 0.7 * losses[0], losses


def test_a_halving_round_moves_the_student_towards_two_teacher_steps(teacher_unet):
    """Progressive distillation 4 -> 2 steps: the student's x0 at grid point s_2i approaches the x0 whose
    one DDIM step lands where two of the previous model's land; at the last point (s_2N = 0) that is x''."""
    previous = distill.student_from(teacher_unet, 8).eval()
    unet = distill.student_from(teacher_unet, 8).train()
    x0, noise, cond, _, w = _batch()
    grid = SCHEDULE.sigmas_for(4, "trailing").float()
    i = torch.tensor([0, 1, 0, 1])
    losses = _falls(lambda: distill.halving_loss(_denoiser(unet), _denoiser(previous), grid, x0, noise, i, cond, w), unet)
    assert losses[-1] < 0.7 * losses[0], losses
    # the target: one DDIM step of the target x0 from s lands on the teacher's two steps
    from dreamlab.core.objectives import ddim_step, ddim_x0_target

    x, x2 = torch.randn(3, 4), torch.randn(3, 4)
    s, s2 = torch.tensor([5.0, 1.0, 0.5]), torch.tensor([1.0, 0.2, 0.0])
    torch.testing.assert_close(ddim_step(x, ddim_x0_target(x, x2, s, s2), s, s2), x2)


# ----------------------------------------------------------------------------- exported students, generate


def _student_dir(tiny_dir, dest, method="consistency", guidance=(1.0, 8.0)):
    """A student folder of the tiny model as the trainer exports it (untrained: the zero-init copy)."""
    from dreamlab.loading.model import read_spec

    teacher = load_model(tiny_dir)
    cfg = DistillConfig(data="d", out=str(dest.parent), method=method, guidance_min=guidance[0],
                        guidance_max=guidance[1], guidance_dim=8)
    stage = distill.stages(cfg)[-1]
    raw = json.loads((tiny_dir / "dreamlab.json").read_text())
    assert read_spec(tiny_dir).name == raw["name"]
    return distill.export_student(distill.student_from(teacher.unet, 8), None, tiny_dir, raw, dest, cfg, teacher, stage,
                                  {"steps": 0})


@pytest.fixture(scope="module")
def student(tiny_dir, tmp_path_factory):
    return load_model(_student_dir(tiny_dir, tmp_path_factory.mktemp("students") / "fast"))


class _Rows:
    """A stage input whose model wrapper records the rows of every network call."""

    def __init__(self):
        self.rows = []

    def model_wrapper(self, i, noise, sigmas):
        def wrap(call):
            self.rows.append((call.x_t.shape[0], None if call.cond is None or call.cond.guidance is None
                              else call.cond.guidance.tolist()))
            return call

        return wrap


def test_an_exported_student_loads_and_generates_with_its_defaults(student, tiny):
    d = student.defaults
    assert (d.sampler, d.steps, d.schedule, d.cfg_scale) == ("lcm", 4, "trailing", 5.0)
    assert student.student.method == "consistency" and student.student.guidance == (1.0, 8.0)
    assert student.student.teacher == tiny.name and student.takes_guidance
    rows = _Rows()
    result = generate(student, make_request(prompt="red apple", seed=1), inputs=[rows])
    m = result.records[0]
    assert m.sampler == "lcm" and len(m.sigmas) == 5 and result.images[0].size == (16, 16)
    # guidance folded in: one row per step, the scale in it, no unconditional row
    assert rows.rows == [(1, [5.0])] * 4
    # ... and at scale 1 too; the teacher runs two rows at its CFG
    rows.rows.clear()
    generate(student, make_request(prompt="red apple", seed=1, cfg_scale=1.0), inputs=[rows])
    assert rows.rows == [(1, [1.0])] * 4
    teacher_rows = _Rows()
    generate(tiny, make_request(prompt="red apple", seed=1, steps=2, cfg_scale=5.0), inputs=[teacher_rows])
    assert [r for r, _ in teacher_rows.rows] == [2, 2]
    # replayable: the same request gives the same image
    again = generate(student, make_request(prompt="red apple", seed=1))
    assert torch.equal(again.latents, result.latents)


def test_a_student_with_composed_prompts_negative_prompts_and_out_of_range_scales(student):
    rows = _Rows()
    generate(student, make_request(prompt="red apple AND star :0.5", seed=1, steps=1), inputs=[rows])
    assert rows.rows == [(3, [5.0] * 3)]  # two parts + the empty prompt (weights sum to 1.5)
    rows.rows.clear()
    result = generate(student, make_request(prompt="red apple", negative_prompt="blue", seed=1, steps=1), inputs=[rows])
    assert rows.rows == [(2, [1.0, 1.0])]  # CFG on top of its scale-1 prediction, and said so
    assert any("negative prompt" in n for n in result.notes)
    for bad, match in [({"cfg_scale": 12.0}, r"distilled for cfg_scale in \[1, 8\]"),
                       ({"guidance_rescale": 0.5}, "guidance_rescale")]:
        with pytest.raises(InvalidRequestError, match=match) as info:
            generate(student, make_request(prompt="red apple", seed=1, **bad))
        assert "\n" not in str(info.value)


def test_a_student_without_scale_1_refuses_a_negative_prompt_in_one_line(tiny_dir, tmp_path):
    narrow = load_model(_student_dir(tiny_dir, tmp_path / "narrow", guidance=(3.0, 8.0)))
    with pytest.raises(InvalidRequestError, match="negative prompt") as info:
        generate(narrow, make_request(prompt="red apple", negative_prompt="blue", seed=1))
    assert "\n" not in str(info.value)
    generate(narrow, make_request(prompt="red apple", seed=1, steps=1))  # its folded path still runs


def _png(path, size=16, seed=0, mode="RGBA"):
    import numpy as np
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 255, (size, size, len(mode)), dtype=np.uint8)
    Image.fromarray(a.squeeze(-1) if mode == "L" else a, mode).save(path)
    return path


def test_img2img_and_inpainting_with_a_consistency_student_keep_the_steps(student, tmp_path):
    src, mask = encode_image(_png(tmp_path / "src.png")), encode_image(_png(tmp_path / "mask.png", seed=1))
    for strength in (0.2, 0.6):
        r = generate(student, make_request(prompt="red apple", seed=1, init_image=src, strength=strength))
        assert len(r.records[0].sigmas) == 5  # 4 steps below the strength's level, not int(4 * strength)
        assert r.records[0].sigmas[0] == pytest.approx(float(student.schedule.t_to_sigma(torch.tensor(strength * 1000 - 1))))
    r = generate(student, make_request(prompt="red apple", seed=1, init_image=src, mask_image=mask, strength=1.0))
    assert len(r.records[0].sigmas) == 5
    # a truncating sampler at low strength keeps no step: the image comes back, and the user is told
    r = generate(student, make_request(prompt="red apple", seed=1, init_image=src, strength=0.2, sampler="ddim"))
    assert len(r.records[0].sigmas) == 1 and any("keeps no step" in n for n in r.notes)


def test_a_student_uses_its_teachers_controlnets_and_refuses_edits(student, tiny, tmp_path, monkeypatch):
    from dreamlab.control.conditions import get_condition
    from dreamlab.models.controlnet import controlnet_from_unet, save_controlnet

    net = controlnet_from_unet(tiny.unet, get_condition("canny").channels, tiny.space.factor)
    save_controlnet(net, tmp_path / "cn" / "canny", "canny", tiny.files, tiny.name, {"steps": 0})
    monkeypatch.setenv("DREAMLAB_CONTROLNETS", str(tmp_path / "cn"))
    view = student.clone()
    view._controlnets = {}
    assert "canny" in view.controlnets()
    hint = encode_image(_png(tmp_path / "edges.png", mode="L"))
    r = generate(view, make_request(prompt="red apple", seed=1, controls=[{"condition": "canny", "image": hint}]))
    assert r.records[0].adapters[0].kind == "controlnet"
    with pytest.raises(InvalidRequestError, match="consistency student") as info:
        generate(student, make_request(prompt="red apple", seed=1, edit={"target": "green apple"}))
    assert "\n" not in str(info.value)


def test_a_progressive_student_samples_its_grid_with_ddim(tiny_dir, tmp_path):
    pd = load_model(_student_dir(tiny_dir, tmp_path / "pd", method="progressive"))
    assert (pd.defaults.sampler, pd.defaults.steps, pd.defaults.schedule) == ("ddim", 1, "trailing")
    assert pd.student.method == "progressive"
    rows = _Rows()
    generate(pd, make_request(prompt="red apple", seed=1), inputs=[rows])
    assert rows.rows == [(1, [5.0])]


# ---------------------------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def minilm_teacher(tmp_path_factory):
    """A tiny latent teacher as the trainer needs one: the packaged MiniLM encoder (the cache's), an
    autoencoder with the emoji one's 4x factor, 64x64 images."""
    from diffusers import DDPMScheduler

    from dreamlab.models.tiny import make_tiny_vae, tiny_unet

    root = tmp_path_factory.mktemp("teacher") / "teacher"
    tiny_unet(cross_dim=384, sample_size=16, seed=4).save_pretrained(root / "unet")
    make_tiny_vae(root / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="v_prediction").save_pretrained(root / "scheduler")
    (root / "dreamlab.json").write_text(json.dumps({"name": "tiny-teacher", "sample_size": 64, "use_mask": True,
                                                    "text_encoder": {"source": "minilm", "max_length": 8, "pooling": "mean"}}))
    return root


FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "emoji"
TINY_RUN = dict(batch_size=2, log_every=1, ckpt_every=1, snapshot_every=0, samples=False, guidance_dim=8, device="cpu")


def test_consistency_training_resumes_and_exports_a_student(minilm_teacher, tmp_path):
    from dreamlab.train.common import latest_checkpoint

    out = tmp_path / "lcm"
    cfg = DistillConfig(data=str(FIXTURE), out=str(out), teacher=str(minilm_teacher), steps=2, **TINY_RUN)
    distill.train_distill(cfg)
    assert latest_checkpoint(out).name == "step-0000002"
    first = (latest_checkpoint(out) / "training_state.pt").read_bytes()
    with open(out / "log.jsonl", "a") as f:  # a step logged after the last checkpoint, then killed
        f.write(json.dumps({"step": 3, "loss": 99.0, "time": 0.0}) + "\n")
    distill.train_distill(replace(cfg, steps=3))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] != 99.0 for r in log)
    assert "loss_consistency" in log[0] and (out / "loss.png").exists()
    assert first != (latest_checkpoint(out) / "training_state.pt").read_bytes()
    student = load_model(out / "model")
    assert student.name == "fast" and student.defaults.sampler == "lcm"
    assert json.loads((out / "model" / "dreamlab.json").read_text())["training"]["steps"] == 3
    with pytest.raises(DreamlabError, match="consistency run"):
        distill.train_distill(replace(cfg, method="progressive"))


def test_progressive_training_halves_round_by_round_and_resumes_at_a_round(minilm_teacher, tmp_path):
    out = tmp_path / "pd"
    cfg = DistillConfig(data=str(FIXTURE), out=str(out), teacher=str(minilm_teacher), method="progressive", steps=1,
                        progressive_from=4, progressive_to=2, **TINY_RUN)
    distill.train_distill(cfg)  # guided, then 4 -> 2
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["2step", "guided"]
    distill.train_distill(replace(cfg, progressive_to=1))  # resumes at the end of round 1: 2 -> 1 from its export
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and [k for k in log[2] if k.startswith("loss_")] == ["loss_1step"]
    one = load_model(out / "stages" / "1step")
    assert (one.name, one.defaults.sampler, one.defaults.steps) == ("fast-1step", "ddim", 1)
    assert one.student.teacher == "tiny-teacher"


def test_config_errors_are_one_line():
    for bad in (dict(method="magic"), dict(guidance_min=5.0, guidance_max=2.0), dict(progressive_from=12, progressive_to=1),
                dict(cfg_scale=20.0)):
        with pytest.raises(DreamlabError) as info:
            distill.check_config(DistillConfig(data="d", out="o", **bad))
        assert "\n" not in str(info.value)


def test_init_continues_a_consistency_student_and_refuses_anything_else(minilm_teacher, tmp_path):
    """The shipped student (or a snapshot) is the fallback resume point: --init starts a new run from its UNet."""
    from safetensors.torch import load_file

    first = tmp_path / "first"
    cfg = DistillConfig(data=str(FIXTURE), out=str(first), teacher=str(minilm_teacher), steps=1, **TINY_RUN)
    distill.train_distill(cfg)
    again = tmp_path / "again"
    distill.train_distill(replace(cfg, out=str(again), init=str(first / "model"), steps=1, lr=0.0))
    # lr 0: the new run's student is the one it started from, not a fresh copy of the teacher
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(first / "model" / weights)), load_file(str(again / "model" / weights))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["time_embedding.cond_proj.weight"].abs().sum() > 0  # (the trained projection, not the zero init)
    info = json.loads((again / "model" / "dreamlab.json").read_text())["training"]
    assert info["init"] == str(first / "model")
    for bad, msg in ((dict(init=str(minilm_teacher)), "not a consistency student"),
                     (dict(init=str(tmp_path / "none")), "--init"),
                     (dict(init=str(first / "model"), method="progressive"), "continues a consistency student")):
        with pytest.raises(DreamlabError, match=msg) as e:
            distill.train_distill(replace(cfg, out=str(tmp_path / "bad"), **bad))
        assert "\n" not in str(e.value)
