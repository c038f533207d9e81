"""Text-driven editing: attention control, prompt-to-prompt's invariants, local blend, inversion (toy
and default model), DiffEdit, the CLI, replay, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dreamlab.cli import main
from dreamlab.control.attention import CrossAttentionStore, Observe, attention_patch
from dreamlab.control.prompt2prompt import LocalBlend
from dreamlab.control.tokens import align
from dreamlab.core.inversion import ddim_invert
from dreamlab.core.samplers import get_sampler
from dreamlab.errors import InvalidRequestError
from dreamlab.generate import encode_image, generate, make_request


def _edit(model, target, prompt="red apple", **spec):
    return generate(model, make_request(prompt=prompt, seed=2, steps=5, edit={"target": target, **spec}))


def _eq(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------ attention control


def test_a_controller_that_changes_nothing_gives_the_models_output(tiny):
    req = make_request(prompt="red apple", seed=1, steps=4)
    plain = generate(tiny, req).pixels
    read_only = generate(tiny, req, patches=[attention_patch(CrossAttentionStore())]).pixels
    assert torch.equal(read_only, plain)  # nothing materialised into the output: bit for bit
    materialised = generate(tiny, req, patches=[attention_patch(Observe())]).pixels
    torch.testing.assert_close(materialised, plain, rtol=0, atol=1e-5)
    processors = dict(tiny.unet.attn_processors)
    assert all(type(p).__name__ != "ControlledProcessor" for p in processors.values())


def test_token_alignment_maps_kept_tokens_and_marks_added_ones():
    assert align([1, 5, 7, 2], [1, 5, 9, 7, 2]) == [0, 1, -1, 2, 3]
    assert align([1, 5, 2], [1, 5, 2]) == [0, 1, 2]


# ------------------------------------------------------------------------------------- prompt-to-prompt


def test_the_source_is_plain_generation_and_an_unchanged_prompt_returns_it(tiny):
    plain = generate(tiny, make_request(prompt="red apple", seed=2, steps=5)).images[0]
    same = _edit(tiny, "red apple")
    assert _eq(same.sources[0], plain) and _eq(same.images[0], plain)
    assert _eq(_edit(tiny, "red apple", reweight={"red": 1.0}).images[0], plain)  # reweight 1: a no-op
    swapped = _edit(tiny, "green apple")
    assert _eq(swapped.sources[0], plain) and not _eq(swapped.images[0], plain)
    assert not _eq(_edit(tiny, "red apple", reweight={"red": 3.0}).images[0], plain)


def test_local_blend_keeps_the_source_outside_its_mask_at_every_step(tiny, monkeypatch):
    seen = []
    original = LocalBlend.__call__

    def recording(self, info):
        out = original(self, info)
        seen.append((out, self.masks[-1] if out is not None else None))
        return out

    monkeypatch.setattr(LocalBlend, "__call__", recording)
    res = _edit(tiny, "green apple", local_blend=["apple"], blend_threshold=0.5)
    blended = [(x, m) for x, m in seen if x is not None]
    assert len(blended) == 5  # every step
    for x, m in blended:
        outside = (m == 0).expand_as(x[0])
        assert torch.equal(x[1][outside], x[0][outside])
    assert res.masks[0] is not None and 0 < (np.asarray(res.masks[0]) > 0).mean() < 1


def test_refine_adds_words(tiny):
    plain = generate(tiny, make_request(prompt="red apple", seed=2, steps=5)).images[0]
    refined = _edit(tiny, "red apple face")
    assert _eq(refined.sources[0], plain) and not _eq(refined.images[0], plain)


# --------------------------------------------------------------------------------------------- inversion


def test_ddim_inversion_on_the_gaussian_toy_returns_the_starting_noise():
    """Data N(mu, c^2): the exact denoiser is D(x, s) = mu + c^2 / (c^2 + s^2) (x - mu), so the ODE has a
    closed form; DDIM there and back on a fine grid must come back to where it started."""
    mu, c = 0.3, 0.8

    def exact(x, sigma, cond):
        s2 = sigma.reshape(-1, 1, 1, 1) ** 2
        return mu + c**2 / (c**2 + s2) * (x - mu)

    from dreamlab.core.schedules import karras

    errors = []
    for n in (100, 400):
        sigmas = karras(n, 0.002, 20.0)
        z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * float(sigmas[0])
        x0 = get_sampler("ddim")(exact, z, sigmas)
        errors.append(float(((ddim_invert(exact, x0, sigmas)[0] - z).abs() / z.abs()).max()))
        # with fixed-point refinement every step is the DDIM step's exact inverse
        torch.testing.assert_close(ddim_invert(exact, x0, sigmas, refine=20)[0], z, rtol=1e-6, atol=1e-6)
    assert errors[1] < 0.03 and errors[1] < errors[0] / 3  # the plain inversion: first order in the step


def _psnr(a, b):
    a, b = (np.asarray(im.convert("RGBA"), np.float32) for im in (a, b))
    return 10 * np.log10(255**2 / ((a - b) ** 2).mean())


@pytest.mark.slow
def test_null_text_inversion_reconstructs_better_than_ddim_at_cfg_5(tmp_path, monkeypatch):
    from dreamlab.data.dataset import to_rgba_uint8
    from dreamlab.loading.model import load_model

    monkeypatch.setenv("DREAMLAB_CACHE", str(tmp_path))
    model = load_model()
    arr = np.load(__import__("pathlib").Path(__file__).parent / "fixtures" / "emoji" / "images.npy")[3]
    Image.fromarray(arr, "RGBA").save(tmp_path / "real.png")
    psnr = {}
    for inversion in ("ddim", "null-text"):
        req = make_request(prompt="grinning face", seed=0, steps=10, cfg_scale=5.0, init_image=encode_image(tmp_path / "real.png"),
                           edit={"target": "grinning face", "inversion": inversion, "null_text_iters": 5})
        psnr[inversion] = _psnr(generate(model, req).images[0], Image.open(tmp_path / "real.png"))
    assert psnr["null-text"] > psnr["ddim"] + 1.0, psnr
    assert list(tmp_path.glob("inversions/*.safetensors"))  # cached for the next edit of this image
    del to_rgba_uint8


# --------------------------------------------------------------------------------------------- DiffEdit


def test_diffedit_keeps_the_pixels_outside_its_mask(tiny):
    res = _edit(tiny, "green apple", auto_mask=True, mask_noises=3)
    mask = np.asarray(res.masks[0]) > 0
    src, out = np.asarray(res.sources[0]), np.asarray(res.images[0])
    assert np.array_equal(src[~mask], out[~mask])


# ----------------------------------------------------------------------------------------- CLI and errors


def test_edit_from_the_cli_and_replay(tiny_dir, tmp_path, capsys):
    out, src = tmp_path / "e.png", tmp_path / "s.png"
    assert main(["edit", "red apple", "--to", "green apple", "--reweight", "green=2", "--model", str(tiny_dir),
                 "--seed", "3", "--steps", "4", "-o", str(out), "--save-source", str(src)]) == 0
    assert main(["replay", str(out), "-o", str(tmp_path / "r.png")]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["replay", str(src), "-o", str(tmp_path / "r2.png")]) == 0  # the source is plain generation
    assert "identical" in capsys.readouterr().out
    assert main(["attention", "red apple", "--model", str(tiny_dir), "--steps", "3", "--seed", "0", "-o", str(tmp_path / "m.png")]) == 0
    assert Image.open(tmp_path / "m.png").size[0] > 3 * 16


@pytest.mark.parametrize("spec,prompt,message", [
    ({"target": "a green apple tree", "mode": "replace"}, "red apple", "use refine for added words"),
    ({"target": "green apple", "reweight": {"blue": 2}}, "red apple", "'blue' is not a word of the prompt 'green apple' (its words: green, apple)"),
    ({"target": "green apple", "local_blend": ["pear"]}, "red apple", "'pear' is not a word of the prompt"),
    ({"target": "green " * 40}, "red apple", "reads at most"),
    ({"target": "a AND b"}, "red apple", "not prompts composed with AND"),
])
def test_bad_edits_get_one_line(tiny, spec, prompt, message):
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        generate(tiny, make_request(prompt=prompt, seed=0, steps=3, edit=spec))


def test_editing_an_unreadable_image_or_with_a_stochastic_sampler_is_refused(tiny, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["edit", "red apple", "--to", "green apple", "--image", str(tmp_path / "bad.png")]) == 2
    assert "is not a readable image" in capsys.readouterr().err
    good = encode_image(Image.new("RGBA", (16, 16), (255, 0, 0, 255)))
    with pytest.raises(InvalidRequestError, match="use a deterministic sampler"):
        generate(tiny, make_request(prompt="red apple", init_image=good, sampler="euler_ancestral", edit={"target": "green apple"}))


def test_edit_jobs_on_the_server_leave_the_model_as_it_was(tiny, tmp_path):
    import io
    import time

    from fastapi.testclient import TestClient

    from dreamlab.server.app import create_app
    from dreamlab.server.ui import build_request

    form = dict(mode="edit", prompt="red apple", negative_prompt="", sampler="euler", schedule="karras", steps=4, cfg_scale=4,
                seed=3, batch=1, width=16, height=16, edit_target="green apple", edit_blend="apple", edit_reweight="green=2")
    edit = build_request(**form)
    assert edit.edit.local_blend == ["apple"] and edit.edit.reweight == {"green": 2.0}
    before = {k: id(v) for k, v in tiny.unet.attn_processors.items()}
    fresh = generate(tiny, make_request(prompt="red apple", seed=3, steps=4, sampler="euler", cfg_scale=4)).images[0]

    def run(client, body):
        job_id = client.post("/api/jobs", json=body).json()["id"]
        for _ in range(600):
            job = client.get(f"/api/jobs/{job_id}").json()
            if job["state"] in ("done", "failed"):
                return job
            time.sleep(0.05)
        raise AssertionError(job)

    with TestClient(create_app(tiny, tmp_path / "data", ui=False)) as client:
        job = run(client, edit.model_dump())
        assert job["state"] == "done" and len(job["images"]) == 3  # the edit, its source, its attention sheet
        plain = run(client, {"prompt": "red apple", "seed": 3, "steps": 4, "sampler": "euler", "cfg_scale": 4})
        png = client.get(plain["images"][0]["url"]).content
        source = client.get(job["images"][1]["url"]).content
    assert _eq(Image.open(io.BytesIO(png)), fresh) and _eq(Image.open(io.BytesIO(source)), fresh)
    assert {k: id(v) for k, v in tiny.unet.attn_processors.items()} == before
