"""generate(): the request schema, reproducibility, batch invariance, manifests and clear errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from dreamlab.cli import main
from dreamlab.errors import InvalidRequestError, NonFiniteError, UnknownNameError, UnsafeCheckpointError
from dreamlab.generate import generate, make_request
from dreamlab.loading.model import load_model
from dreamlab.metadata import read_manifest, save_png


def test_generates_rgba_images_of_the_requested_size(tiny):
    res = generate(tiny, make_request(prompt="red apple", steps=3, seed=1, batch=2, width=32, height=16))
    assert len(res.images) == 2
    assert all(im.mode == "RGBA" and im.size == (32, 16) for im in res.images)
    m = res.manifests[1]
    assert m["seed"] == 2 and m["request"]["seed"] == 2 and m["request"]["batch"] == 1
    assert len(m["sigmas"]) == 4 and m["sigmas"][-1] == 0.0
    assert "unet/diffusion_pytorch_model.safetensors" in m["model"]["files"]


def test_same_request_same_image(tiny):
    req = make_request(prompt="red apple", steps=4, seed=7, sampler="euler_ancestral")
    a, b = generate(tiny, req), generate(tiny, req)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert torch.equal(a.latents, b.latents)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "ddpm"])
def test_batch_invariance_bit_for_bit(tiny, sampler):
    batch = generate(tiny, make_request(prompt="a cat", negative_prompt="dog", steps=4, seed=10, batch=3, sampler=sampler, cfg_scale=3))
    alone = generate(tiny, make_request(prompt="a cat", negative_prompt="dog", steps=4, seed=11, batch=1, sampler=sampler, cfg_scale=3))
    assert torch.equal(batch.latents[1:2], alone.latents)


def test_negative_prompt_changes_the_image(tiny):
    a = generate(tiny, make_request(prompt="a cat", steps=3, seed=1, cfg_scale=4))
    b = generate(tiny, make_request(prompt="a cat", negative_prompt="dog", steps=3, seed=1, cfg_scale=4))
    assert not torch.equal(a.latents, b.latents)


def test_bad_requests_name_the_problem(tiny):
    with pytest.raises(UnknownNameError, match="unknown sampler 'foo'; known: .*euler"):
        make_request(sampler="foo")
    with pytest.raises(InvalidRequestError, match="^steps: "):
        make_request(steps=0)
    with pytest.raises(InvalidRequestError, match="batch"):
        make_request(batch=1000)
    with pytest.raises(InvalidRequestError, match="not divisible by the model's factor 2"):
        generate(tiny, make_request(width=17, steps=1))
    with pytest.raises(InvalidRequestError, match="takes no eta"):
        generate(tiny, make_request(sampler="euler", eta=0.5, steps=1))
    with pytest.raises(InvalidRequestError, match="unknown_field"):
        make_request(unknown_field=1)


def test_nan_in_model_output_is_a_clear_error(tiny_dir):
    model = load_model(tiny_dir)
    model.unet.conv_out.bias.data.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="NaN or Inf at sigma="):
        generate(model, make_request(prompt="x", steps=2, seed=0))


def test_png_carries_manifest_and_a1111_parameters(tiny, tmp_path):
    res = generate(tiny, make_request(prompt="red apple", negative_prompt="blurry", steps=2, seed=5))
    path = save_png(res.images[0], tmp_path / "a.png", res.manifests[0])
    assert read_manifest(path) == json.loads(json.dumps(res.manifests[0]))
    from PIL import Image

    params = Image.open(path).text["parameters"]
    assert params.startswith("red apple\nNegative prompt: blurry\nSteps: 2, Sampler: dpmpp_2m")
    assert "Seed: 5" in params and "Size: 16x16" in params


def test_pickled_weights_are_refused_unless_allowed(tiny_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    d = tmp_path / "pickled"
    shutil.copytree(tiny_dir, d)
    unet = UNet2DConditionModel.from_pretrained(d / "unet")
    shutil.rmtree(d / "unet")
    unet.save_pretrained(d / "unet", safe_serialization=False)
    from transformers import AutoModel

    te = AutoModel.from_pretrained(d / "text_encoder")
    shutil.rmtree(d / "text_encoder")
    te.save_pretrained(d / "text_encoder", safe_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="only pickled weights"):
        load_model(d)
    assert load_model(d, allow_pickle=True).unet.config.in_channels == 4


def test_cli_generate_writes_pngs(tiny_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    rc = main(["generate", "red apple", "-o", str(out), "--model", str(tiny_dir), "--seed", "3", "--steps", "2", "--batch", "2", "-q"])
    assert rc == 0
    assert read_manifest(tmp_path / "img-1.png")["seed"] == 4


def test_cli_grid_is_the_same_images_as_generate_with_labels(tiny_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    prompts = ["red apple", "a prompt far too long to fit under one small image in the sheet", "cat"]
    assert main(["grid", *prompts, "-o", str(out), "--model", str(tiny_dir), "--steps", "2", "--cols", "2", "--seed", "5"]) == 0
    sheet = Image.open(out)
    assert sheet.size == (2 * (150 + 6) + 6, 2 * (32 + 16 + 6) + 6)  # 16 px images at scale 2, cells >= 150 px wide
    # The third cell (row 2, col 1) holds the image generate() makes for "cat" with seed 5 + 2.
    assert main(["generate", "cat", "-o", str(tmp_path / "cat.png"), "--model", str(tiny_dir), "--steps", "2", "--seed", "7",
                 "--cfg", "5", "-q"]) == 0
    from dreamlab.images import on_background

    cat = on_background(Image.open(tmp_path / "cat.png")).resize((32, 32), Image.NEAREST)
    x0, y0 = 6 + (150 - 32) // 2, 6 + (32 + 16 + 6)
    assert list(sheet.crop((x0, y0, x0 + 32, y0 + 32)).getdata()) == list(cat.getdata())


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--sampler", "nope"], "unknown sampler 'nope'"),
        (["--steps", "0"], "steps:"),
        (["--width", "15"], "not divisible"),
        (["--cfg", "-1"], "cfg_scale:"),
    ],
)
def test_cli_bad_input_is_one_line(tiny_dir, tmp_path, capsys, argv, needle):
    rc = main(["generate", "x", "-o", str(tmp_path / "o.png"), "--model", str(tiny_dir), "-q", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and needle in err and "\n" not in err


def test_cli_says_when_no_model_is_installed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DREAMLAB_MODEL", str(tmp_path / "nothing"))
    assert main(["generate", "red apple", "-o", str(tmp_path / "o.png")]) == 2
    assert "no trained model is installed" in capsys.readouterr().err


def test_cli_missing_model_folder(tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "o.png")]) == 2
    assert "no model at" in capsys.readouterr().err


def _source_image(size=16):
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
    arr[..., 3] = 255
    return Image.fromarray(arr, "RGBA")


def test_img2img_strength_zero_returns_the_autoencoded_source(tiny):
    from dreamlab.generate import encode_image

    src = _source_image()
    res = generate(tiny, make_request(prompt="x", init_image=encode_image(src), strength=0.0, seed=1, steps=10))
    assert res.manifests[0]["sigmas"] == [0.0]  # the grid actually walked: nothing
    pixels = torch.from_numpy(np.asarray(src, dtype=np.float32).copy()).permute(2, 0, 1)[None] / 127.5 - 1
    assert torch.allclose(res.latents, tiny.space.encode(pixels), atol=1e-6)
    half = generate(tiny, make_request(prompt="x", init_image=encode_image(src), strength=0.5, seed=1, steps=10))
    assert not torch.equal(half.latents, res.latents)
    assert res.manifests[0]["request"]["init_image"].startswith("sha256:")


def test_inpainting_keeps_the_known_region_exactly(tiny):
    from PIL import Image

    from dreamlab.generate import encode_image

    src = _source_image()
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, 8:] = 255  # repaint the right half
    res = generate(
        tiny,
        make_request(prompt="x", init_image=encode_image(src), mask_image=encode_image(Image.fromarray(mask, "L")), strength=1.0, seed=2, steps=4),
    )
    out = np.asarray(res.images[0])
    assert np.array_equal(out[:, :8], np.asarray(src)[:, :8])
    assert not np.array_equal(out[:, 8:], np.asarray(src)[:, 8:])


def test_bad_input_images_are_clear_errors(tiny, tmp_path, capsys):
    import base64

    with pytest.raises(InvalidRequestError, match="init_image is not a readable image"):
        generate(tiny, make_request(init_image=base64.b64encode(b"not a png").decode(), steps=1))
    with pytest.raises(InvalidRequestError, match="init_image is not valid base64"):
        generate(tiny, make_request(init_image="%%%", steps=1))
    with pytest.raises(InvalidRequestError, match="mask_image needs an init_image"):
        generate(tiny, make_request(mask_image="AAAA", steps=1))
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert main(["generate", "x", "--init-image", str(bad), "-q", "-o", str(tmp_path / "o.png")]) == 2
    assert "is not a readable image" in capsys.readouterr().err
    assert main(["generate", "x", "--init-image", str(tmp_path / "missing.png"), "-q", "-o", str(tmp_path / "o.png")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_composed_prompts_parse_into_weighted_parts():
    from dreamlab.generate import MAX_PROMPT_PARTS, split_prompt

    assert split_prompt("a cat AND a hat :0.5 AND snow :-1") == [("a cat", 1.0), ("a hat", 0.5), ("snow", -1.0)]
    assert split_prompt("ratio 16:9, red apple :2") == [("ratio 16:9, red apple :2", 1.0)]  # one part: as written
    assert split_prompt("cats and dogs ANDROID") == [("cats and dogs ANDROID", 1.0)]
    assert split_prompt("16:9 AND x") == [("16:9", 1.0), ("x", 1.0)]
    assert split_prompt("a\nAND b :.5") == [("a", 1.0), ("b", 0.5)]
    with pytest.raises(InvalidRequestError, match="part 2 of the prompt"):
        split_prompt("a AND AND b")
    with pytest.raises(InvalidRequestError, match="part 1 of the prompt"):
        split_prompt("AND b")
    with pytest.raises(InvalidRequestError, match=r"^prompt: .*part 2 of the prompt \(between ANDs\) is empty"):
        make_request(prompt="a AND  :2 AND c")
    with pytest.raises(InvalidRequestError, match=r"part 1 of the prompt \('a'\) has weight 11.0; at most 10.0"):
        make_request(prompt="a :11 AND b")
    with pytest.raises(InvalidRequestError, match=f"composes {MAX_PROMPT_PARTS + 1} parts with AND; at most {MAX_PROMPT_PARTS}"):
        make_request(prompt=" AND ".join(["x"] * (MAX_PROMPT_PARTS + 1)))


def test_composed_prompt_guides_by_each_part(tiny):
    """"a AND b" differs from both parts alone; a part of weight 0 adds nothing (up to the batched forward's
    rounding); the prompt as written goes into the manifest, and the same request gives the same image."""
    def latents(prompt, **kw):
        return generate(tiny, make_request(prompt=prompt, steps=3, seed=2, cfg_scale=4, **kw)).latents

    both = latents("red apple AND green leaf")
    assert not torch.allclose(both, latents("red apple")) and not torch.allclose(both, latents("green leaf"))
    torch.testing.assert_close(latents("red apple AND green leaf :0"), latents("red apple"), rtol=1e-4, atol=1e-4)
    assert torch.equal(both, latents("red apple AND green leaf"))
    away = latents("red apple AND green leaf :-1")
    assert not torch.allclose(away, both)
    res = generate(tiny, make_request(prompt="red apple AND green leaf :-1", steps=2, seed=2, cfg_scale=1))
    assert res.manifests[0]["request"]["prompt"] == "red apple AND green leaf :-1"  # composed even at scale 1
    assert not torch.equal(res.latents, generate(tiny, make_request(prompt="red apple", steps=2, seed=2, cfg_scale=1)).latents)
