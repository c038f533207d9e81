"""The engine's seams (docs/engine.md): the shared training/sampling adapter, guiders and row roles,
model wrappers evaluated every step, scoped patches, and per-model defaults and inputs."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from dreamlab.core.guidance import classifier_free
from dreamlab.core.guiders import CFG, ImageTextCFG, guide
from dreamlab.core.objectives import l_simple, q_sample
from dreamlab.core.prediction import Denoiser, Prediction, _b
from dreamlab.core.samplers import get_sampler
from dreamlab.core.schedules import DiscreteSchedule
from dreamlab.core.types import Cond, ModelCall, Residuals, Role, Row
from dreamlab.errors import DreamlabError, InvalidRequestError
from dreamlab.generate import generate, make_request
from dreamlab.loading.model import load_model
from dreamlab.models.patches import AttentionProcessors, CallProcessor, TokenEmbeddings, WeightDelta, patched
from dreamlab.models.text import masked_mean
from dreamlab.models.unet import UNetModelFn

# ------------------------------------------------------------------ one adapter for training and sampling

# L_simple of one fixed batch through the trainer's old private forward (UNet called with the Cond's
# fields by hand), recorded before the trainer moved onto the sampling adapter (Denoiser.loss).
GOLDEN_LOSS = {"plain": 0.12646538019180298, "pooled": 0.12750940024852753, "sr": 0.12399676442146301}


def _train_batch(kind):
    from dreamlab.train.unet import UNetConfig, build_unet, schedule_config

    torch.manual_seed(0)
    cfg = UNetConfig(data="d", vae="v", out="o", block_out_channels=(32, 64), attention_head_dim=8,
                     sr_from=32 if kind == "sr" else None, pooled_text=kind == "pooled")
    unet = build_unet(cfg, cross_dim=16)
    if kind == "pooled":  # the zero-initialised path, made to matter
        torch.nn.init.normal_(unet.class_embedding.linear_2.weight, std=0.02)
    g = torch.Generator().manual_seed(1)
    x0, tokens = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    t, noise = torch.tensor([10, 500, 990]), torch.randn(3, 4, 16, 16, generator=g)
    level, low = torch.tensor([0, 100, 350]), torch.randn(3, 4, 16, 16, generator=g)
    schedule = DiscreteSchedule.from_diffusers_config(schedule_config(cfg.prediction))
    return cfg, unet, schedule, x0, tokens, mask, t, noise, level, low


@pytest.mark.parametrize("kind", ["plain", "pooled", "sr"])
def test_a_training_step_through_the_shared_adapter_gives_the_golden_loss(kind):
    cfg, unet, schedule, x0, tokens, mask, t, noise, level, low = _train_batch(kind)
    prediction = Prediction(cfg.prediction)
    cond = Cond(tokens=tokens, mask=mask)
    concat = class_labels = None
    if kind == "sr":
        concat = q_sample(low, level, noise.flip(0), schedule)
        cond, class_labels = replace(cond, concat=concat, noise_level=level), level
    elif kind == "pooled":
        class_labels = masked_mean(tokens, mask)
        cond = replace(cond, pooled=class_labels)
    with torch.no_grad():
        loss = Denoiser(UNetModelFn(unet, use_mask=True), schedule, prediction).loss(x0, noise, t, cond, min_snr_gamma=5.0)
        # the old forward, by hand, in this process: bit for bit
        x_t = q_sample(x0, t, noise, schedule)
        x_in = torch.cat([x_t, concat], 1) if concat is not None else x_t
        out = unet(x_in, t, encoder_hidden_states=tokens, encoder_attention_mask=mask, class_labels=class_labels).sample
        old = l_simple(out.float(), x0, noise, t, schedule, prediction, min_snr_gamma=5.0)
    assert torch.equal(loss, old)
    assert loss.item() == pytest.approx(GOLDEN_LOSS[kind], rel=1e-5)


# ------------------------------------------------------------------------------------------- guiders


def _reference_classifier_free(denoise, uncond, scale, *, rescale=0.0, weights=None):
    """classifier_free as it was before the guiders (dreamlab 6e2c01d), less its caching and checks."""
    if scale == 1.0 and rescale == 0.0 and weights is None:
        return denoise
    ws = (1.0,) if weights is None else tuple(weights)
    n = len(ws) + 1

    def guided(x, sigma, cond):
        u = uncond
        if u.tokens.shape[0] == 1 and x.shape[0] > 1:
            u = Cond.cat([u] * x.shape[0])
        if scale == 0.0:
            return denoise(x, sigma, u)
        x0_u, *x0_parts = denoise(torch.cat([x] * n), torch.cat([sigma] * n), Cond.cat([u, cond])).chunk(n)
        delta = sum(w * (x0_i - x0_u) for w, x0_i in zip(ws, x0_parts))
        x0 = x0_u + scale * delta
        x0_c = x0_parts[0] if weights is None else x0_u + delta
        if rescale > 0:
            s = _b(sigma, x)
            eps_c, eps_cfg = (x - x0_c) / s, (x - x0) / s
            dims = tuple(range(1, x.ndim))
            ratio = eps_c.std(dim=dims, keepdim=True) / eps_cfg.std(dim=dims, keepdim=True)
            x0 = x - s * eps_cfg * (rescale * ratio + (1 - rescale))
        return x0

    return guided


def _toy(x, sigma, cond):
    """A denoiser whose output depends on every row's tokens and concat, and nonlinearly on x."""
    out = torch.tanh(x) * 0.7 + cond.tokens.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) * sigma.reshape(-1, 1, 1, 1)
    if cond.concat is not None:
        out = out + 0.3 * cond.concat.sin()
    return out


def _tokens(seed, rows=1):
    return torch.randn(rows, 3, 4, generator=torch.Generator().manual_seed(seed))


X = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(9))
SIGMA = torch.tensor([2.0, 2.0])


@pytest.mark.parametrize("scale,rescale,weights", [(5.0, 0.0, None), (7.5, 0.7, None), (0.0, 0.0, None),
                                                   (4.0, 0.0, (1.0, -0.5, 0.25)), (3.0, 0.5, (1.0, 2.0))])
def test_guiders_equal_the_old_classifier_free_bit_for_bit(scale, rescale, weights):
    uncond = Cond(tokens=_tokens(1))  # one row, broadcast over the batch of 2
    k = 1 if weights is None else len(weights)
    cond = Cond.cat([Cond(tokens=_tokens(10 + i, rows=2)) for i in range(k)])
    old = _reference_classifier_free(_toy, uncond, scale, rescale=rescale, weights=weights)(X, SIGMA, cond)
    new = classifier_free(_toy, uncond, scale, rescale=rescale, weights=weights)(X, SIGMA, cond)
    assert torch.equal(old, new)
    direct = guide(_toy, CFG(uncond, scale, weights or (1.0,), rescale, _composed=weights is not None))(X, SIGMA, cond)
    assert torch.equal(direct, new)


def test_every_row_carries_its_role():
    seen = []

    def recording(x, sigma, cond):
        seen.append(cond.roles)
        return _toy(x, sigma, cond)

    cond = Cond.cat([Cond(tokens=_tokens(10, rows=2)), Cond(tokens=_tokens(11, rows=2))]).with_roles(
        (Row(Role.COND, stream=0), Row(Role.COND, stream=1)) * 2)
    guide(recording, CFG(Cond(tokens=_tokens(1)), 5.0, (1.0, 0.5), _composed=True))(X, SIGMA, cond)
    assert seen[0] == (Row(Role.UNCOND, 0, 0), Row(Role.UNCOND, 0, 1), Row(Role.COND, 0, 0), Row(Role.COND, 0, 1),
                       Row(Role.COND, 1, 0), Row(Role.COND, 1, 1))


def test_image_text_guider_reduces_to_cfg_at_image_scale_1_and_follows_its_formula():
    image = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(3))
    uncond, cond = Cond(tokens=_tokens(1)), Cond(tokens=_tokens(2, rows=2), concat=image)
    cfg = guide(_toy, CFG(replace(uncond.repeat(2), concat=image), 6.0))(X, SIGMA, cond)
    assert torch.equal(guide(_toy, ImageTextCFG(uncond, 1.0, 6.0))(X, SIGMA, cond), cfg)
    s_i, s_t = 1.5, 6.0
    u = uncond.repeat(2)
    e00 = _toy(X, SIGMA, replace(u, concat=torch.zeros_like(image)))
    ei0, eit = _toy(X, SIGMA, replace(u, concat=image)), _toy(X, SIGMA, cond)
    got = guide(_toy, ImageTextCFG(uncond, s_i, s_t))(X, SIGMA, cond)
    torch.testing.assert_close(got, e00 + s_i * (ei0 - e00) + s_t * (eit - ei0), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- model wrappers


def _denoise_once(model, wrappers=(), sigmas=None):
    cond = model.encode_prompts(["red apple"])
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    return model.denoiser(wrappers, sigmas=sigmas)(x, torch.tensor([3.0]), cond)


def _zero_residuals(call: ModelCall) -> ModelCall:
    """Residuals of the right shapes for the tiny UNet (8 and 16 channels, 4x4 and 2x2), all zero."""
    b = call.x_t.shape[0]
    z = lambda c, s: torch.zeros(b, c, s, s)  # noqa: E731
    return call.add_residuals(Residuals((z(8, 4), z(8, 4), z(8, 2), z(16, 2)), z(16, 2)))


def test_a_model_wrapper_that_adds_zeros_changes_nothing(tiny):
    assert torch.equal(_denoise_once(tiny, [_zero_residuals]), _denoise_once(tiny))
    one = lambda call: call.add_residuals(Residuals(tuple(torch.ones_like(r) for r in _zero_residuals(call).residuals.down),  # noqa: E731
                                                    torch.ones(call.x_t.shape[0], 16, 2, 2)))
    assert not torch.equal(_denoise_once(tiny, [one]), _denoise_once(tiny))


def test_model_wrappers_see_every_call_with_its_step_index(tiny):
    steps, rows = [], []

    def record(call: ModelCall) -> ModelCall:
        steps.append(call.step)
        rows.append(call.cond.roles)
        return call

    sigmas = tiny.schedule.sigmas_for(4, "karras")
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    cond = tiny.encode_prompts(["red apple"])
    denoise = guide(tiny.denoiser([record], sigmas=sigmas), CFG(tiny.encode_prompts([""]), 5.0))
    get_sampler("heun")(denoise, x, sigmas, cond=cond)
    assert steps == [0, 1, 1, 2, 2, 3, 3]  # Heun: a second evaluation at the next grid point, but on its last step
    assert rows[0] == (Row(Role.UNCOND), Row(Role.COND))


# ------------------------------------------------------------------------------------------- patches


def _image(model, prompt="red apple", **kw):
    return generate(model, make_request(prompt=prompt, seed=3, steps=3, **kw)).pixels


def test_attention_processors_are_scoped_and_bit_identical_when_they_only_read(tiny):
    before = dict(tiny.unet.attn_processors)
    baseline = _image(tiny)
    calls = []
    observe = CallProcessor
    patch = AttentionProcessors(lambda layer: observe(before[f"{layer.name}.processor"], layer,
                                                      lambda layer, call: calls.append((layer.cross, call.step, call.cond.roles))))
    assert torch.equal(generate(tiny, make_request(prompt="red apple", seed=3, steps=3), patches=[patch]).pixels, baseline)
    assert {c[0] for c in calls} == {True, False} and {c[1] for c in calls} == {0, 1, 2}
    assert calls[0][2] == (Row(Role.UNCOND), Row(Role.COND))
    assert {k: id(v) for k, v in tiny.unet.attn_processors.items()} == {k: id(v) for k, v in before.items()}
    assert tiny.pass_call is False


def test_a_weight_patch_is_undone_bit_for_bit_and_scale_0_is_the_base(tiny):
    weights = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    delta = {name: torch.randn_like(weights[name])}
    baseline = _image(tiny)
    assert torch.equal(generate(tiny, make_request(prompt="red apple", seed=3, steps=3),
                                patches=[WeightDelta(delta, 0.0)]).pixels, baseline)
    assert not torch.equal(generate(tiny, make_request(prompt="red apple", seed=3, steps=3),
                                    patches=[WeightDelta(delta, 1.0)]).pixels, baseline)
    assert all(torch.equal(v, weights[k]) for k, v in tiny.unet.state_dict().items())
    with pytest.raises(InvalidRequestError, match="does not have: nope"):
        with patched(tiny, [WeightDelta({"nope": torch.zeros(1)})]):
            pass


def test_token_embeddings_apply_to_one_view_only(tiny):
    encoder = tiny.text_encoder
    module, vocab = encoder.model.get_input_embeddings(), len(encoder.tokenizer)
    base = tiny.encode_prompts(["a red apple"]).tokens
    patch = TokenEmbeddings({"<my-cat>": torch.randn(encoder.dim)})
    with patched(tiny, [patch]) as view:
        assert torch.equal(view.encode_prompts(["a red apple"]).tokens, base)  # unnamed: no change
        assert not torch.equal(view.encode_prompts(["a <my-cat> apple"]).tokens,
                               view.encode_prompts(["a cat apple"]).tokens)
        assert tiny.text_encoder is encoder and len(encoder.tokenizer) == vocab  # the shared one: untouched
    assert encoder.model.get_input_embeddings() is module
    with pytest.raises(InvalidRequestError, match="already exists"):
        with patched(tiny, [TokenEmbeddings({"apple": torch.zeros(encoder.dim)})]):
            pass


def test_a_patch_applied_in_one_server_job_is_gone_in_the_next(tiny, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from dreamlab import generate as generate_module
    from dreamlab.server.app import create_app

    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    delta = {name: torch.randn_like(tiny.unet.get_parameter(name))}
    monkeypatch.setattr(generate_module, "PATCH_PROVIDERS",
                        [lambda model, req: [WeightDelta(delta)] if "patched" in req.prompt else []])
    request = {"prompt": "red apple", "seed": 3, "steps": 3}
    fresh = generate(tiny, make_request(**request)).images[0]
    with TestClient(create_app(tiny, tmp_path / "data", ui=False)) as client:
        ids = [client.post("/api/jobs", json={**request, "prompt": p}).json()["id"] for p in ("patched red apple", "red apple")]
        for job_id in ids:
            for _ in range(600):
                job = client.get(f"/api/jobs/{job_id}").json()
                if job["state"] == "done":
                    break
                import time

                time.sleep(0.05)
            assert job["state"] == "done", job
        png = client.get(job["images"][0]["url"]).content
    import io

    import numpy as np
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(fresh))


# ------------------------------------------------------------------------------ per-model defaults and kinds


def _with_spec(tiny_dir, tmp_path, **spec):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    file = folder / "dreamlab.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **spec}))
    return folder


def test_a_model_gives_its_own_default_sampler_steps_and_guidance(tiny_dir, tmp_path):
    model = load_model(_with_spec(tiny_dir, tmp_path, defaults={"sampler": "euler", "steps": 4, "cfg_scale": 1.0}))
    res = generate(model, make_request(prompt="red apple", seed=1))
    req = res.manifests[0]["request"]
    assert (req["sampler"], req["steps"], req["cfg_scale"], len(res.manifests[0]["sigmas"])) == ("euler", 4, 1.0, 5)
    assert generate(model, make_request(prompt="red apple", seed=1, steps=2)).manifests[0]["request"]["steps"] == 2


def test_the_loader_refuses_a_unet_whose_channels_do_not_match_its_declared_inputs(tiny_dir, tmp_path):
    with pytest.raises(DreamlabError, match=r"takes 4 input channels, but its dreamlab.json declares the input\(s\) "
                                            r"source_image: that needs 8"):
        load_model(_with_spec(tiny_dir, tmp_path, inputs=["source_image"]))
    with pytest.raises(DreamlabError, match="defaults.sampler"):
        load_model(_with_spec(tiny_dir, tmp_path / "b", defaults={"sampler": "nope"}))


# ------------------------------------------------------------------------------ images from before the seams

OLD = __import__("pathlib").Path(__file__).parent / "fixtures" / "replay-6e2c01d"


@pytest.mark.parametrize("name", ["composed", "ancestral", "inpaint"])
def test_images_made_before_the_seams_replay_after_them(name, tiny_dir, tmp_path):
    """PNGs written by dreamlab 6e2c01d (before this redesign) from the tiny model: composed prompts with
    a negative prompt and guidance rescale, an ancestral sampler, inpainting. Bit for bit on the machine
    kind they were made on; within one level where other CPUs' kernels round differently."""
    from dreamlab.replay import replay

    inputs = {"init_image": str(OLD / "source.png"), "mask_image": str(OLD / "mask.png")} if name == "inpaint" else {}
    report = replay(OLD / f"{name}.png", tmp_path / "again.png", model_dir=tiny_dir, inputs=inputs, log=lambda *_: None)
    assert not report.model_diff  # the tiny model is the same files
    assert report.max_diff <= 1 and report.differing <= report.pixels // 100, (report.differing, report.max_diff)


def test_help_and_argument_errors_do_not_import_torch():
    """`dreamlab --help` is the first thing people run: it must not pay for torch and diffusers."""
    import subprocess
    import sys

    code = ("import sys\nfrom dreamlab.cli import main\n"
            "for argv in (['--help'], ['generate'], ['train', 'unet', '--help'], ['edit', 'x']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"
