"""Cascaded super-resolution: the RGBA resize, SR models, cascade folders, and training both stages."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamlab.cli import main
from dreamlab.errors import DreamlabError, InvalidRequestError
from dreamlab.generate import encode_image, generate, make_request
from dreamlab.images import resize
from dreamlab.loading.model import load_model
from dreamlab.metadata import read_manifest
from dreamlab.models.tiny import make_tiny_cascade, make_tiny_model, make_tiny_vae

FIXTURE = Path(__file__).parent / "fixtures" / "emoji"


@pytest.fixture(scope="module")
def cascade_dir(tmp_path_factory):
    return make_tiny_cascade(tmp_path_factory.mktemp("models") / "cascade")


@pytest.fixture(scope="module")
def cascade(cascade_dir):
    return load_model(cascade_dir)


@pytest.fixture(scope="module")
def sr(cascade_dir):
    return load_model(cascade_dir / "sr")


def _rgba(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")


# --------------------------------------------------------------------------------------------- resize


def test_rgba_resize_never_bleeds_the_colour_under_transparent_pixels():
    x = torch.full((1, 4, 4, 4), -1.0)
    x[:, 0, :, :2] = 1.0  # left half: opaque red
    x[:, 3, :, :2] = 1.0
    x[:, 1, :, 2:] = 1.0  # right half: transparent, with green "under" it (arbitrary in straight alpha)
    small = resize(x, 2)
    assert small.shape == (1, 4, 2, 2)
    assert torch.allclose(small[0, :, 0, 0], torch.tensor([1.0, -1, -1, 1]))  # opaque red stays red
    assert torch.allclose(small[0, :, 0, 1], torch.tensor([-1.0, -1, -1, -1]))  # transparent, colour black
    mixed = resize(x, (2, 1))  # each output pixel averages one opaque and one transparent pixel
    assert torch.allclose(mixed[0, 3], torch.zeros(2, 1), atol=1e-6)  # half alpha
    assert torch.allclose(mixed[0, :3, :, 0].T, torch.tensor([1.0, -1, -1]).expand(2, 3), atol=1e-6)  # still pure red


def test_resize_keeps_constant_images_and_is_identity_at_the_same_size():
    x = torch.tensor([0.2, -0.4, 0.6, 0.5]).view(1, 4, 1, 1).expand(2, 4, 8, 8).clone()
    for size in (4, 16, (8, 12)):
        y = resize(x, size)
        assert torch.allclose(y, x[:, :, :1, :1].expand_as(y), atol=1e-5)
    assert resize(x, 8) is x
    rgb = torch.rand(1, 3, 8, 8) * 2 - 1
    assert resize(rgb, 16).abs().max() <= 1  # bicubic overshoot is clamped


# ------------------------------------------------------------------------------------ super-resolution


def test_sr_model_enlarges_its_input_by_its_factor(sr):
    assert sr.sr is not None and sr.sr.from_size == 8 and sr.sample_size == 16
    low = encode_image(_rgba(12, 8))
    res = generate(sr, make_request(prompt="red apple", seed=1, steps=3, lowres_image=low))
    assert res.images[0].size == (24, 16) and res.images[0].mode == "RGBA"
    m = res.manifests[0]
    assert m["noise_level"] == 50 and m["request"]["lowres_image"].startswith("sha256:")
    other = generate(sr, make_request(prompt="red apple", seed=1, steps=3, lowres_image=low, noise_level=300))
    assert other.manifests[0]["noise_level"] == 300
    assert not torch.equal(res.latents, other.latents)  # the level reaches the network
    explicit = generate(sr, make_request(prompt="red apple", seed=1, steps=3, lowres_image=low, width=32, height=32))
    assert explicit.images[0].size == (32, 32)


def test_sr_model_input_changes_the_output(sr):
    a, b = (generate(sr, make_request(prompt="x", seed=1, steps=2, lowres_image=encode_image(_rgba(8, 8, s)))) for s in (0, 1))
    assert not torch.equal(a.latents, b.latents)


def test_sr_model_takes_a_composed_prompt(sr):
    """Every part of "a AND b" sees the same low-res input (it rides in Cond.concat, one row per part)."""
    low = encode_image(_rgba(8, 8))
    one, two = (generate(sr, make_request(prompt=p, seed=1, steps=2, lowres_image=low)) for p in ("x", "x AND y :0"))
    torch.testing.assert_close(two.latents, one.latents, rtol=1e-4, atol=1e-4)


def test_sr_requests_that_cannot_work_are_refused(sr, tiny):
    with pytest.raises(InvalidRequestError, match="super-resolution model: give it a lowres_image"):
        generate(sr, make_request(prompt="x", steps=2))
    with pytest.raises(InvalidRequestError, match="not supported with a super-resolution model"):
        generate(sr, make_request(prompt="x", steps=2, lowres_image=encode_image(_rgba(8, 8)), init_image=encode_image(_rgba(16, 16))))
    with pytest.raises(InvalidRequestError, match="are for super-resolution models"):
        generate(tiny, make_request(prompt="x", steps=2, lowres_image=encode_image(_rgba(8, 8))))
    with pytest.raises(InvalidRequestError, match="are for super-resolution models"):
        generate(tiny, make_request(prompt="x", steps=2, noise_level=10))
    with pytest.raises(InvalidRequestError, match="noise_level"):
        make_request(prompt="x", noise_level=1000)
    with pytest.raises(InvalidRequestError, match="lowres_image is not a readable image"):
        generate(sr, make_request(prompt="x", steps=2, lowres_image="aGVsbG8="))


def test_a_model_described_as_sr_without_the_inputs_for_it_is_refused(tmp_path):
    root = make_tiny_model(tmp_path / "m")
    spec = json.loads((root / "dreamlab.json").read_text())
    (root / "dreamlab.json").write_text(json.dumps({**spec, "super_resolution": {"from_size": 8}}))
    with pytest.raises(DreamlabError, match="needs 8 input channels"):
        load_model(root)


def test_upscale_command_and_replay(cascade_dir, tmp_path, capsys):
    low = tmp_path / "low.png"
    _rgba(8, 8).save(low)
    out = tmp_path / "big.png"
    assert main(["upscale", str(low), "--model", str(cascade_dir / "sr"), "-p", "red apple", "-o", str(out),
                 "--seed", "3", "--steps", "3", "-q"]) == 0
    assert Image.open(out).size == (16, 16)
    # a cascade folder upscales with its SR stage
    assert main(["upscale", str(low), "--model", str(cascade_dir), "-o", str(tmp_path / "big2.png"), "--seed", "3",
                 "--steps", "3", "-p", "red apple", "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "big2.png")))
    capsys.readouterr()
    assert main(["replay", str(out), "-o", str(tmp_path / "again.png")]) == 2
    assert "--lowres-image" in capsys.readouterr().err
    assert main(["replay", str(out), "-o", str(tmp_path / "again.png"), "--lowres-image", str(low)]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["upscale", str(low), "--model", str(cascade_dir / "base"), "-o", str(tmp_path / "x.png")]) == 2
    assert "not a super-resolution model" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- cascade


def test_cascade_generates_at_the_sr_size_with_both_stages_recorded(cascade):
    steps = []
    res = generate(cascade, make_request(prompt="red apple", seed=5, steps=3, batch=2),
                   on_step=lambda info: steps.append((info.i, info.total)))
    assert [im.size for im in res.images] == [(16, 16)] * 2
    assert steps == [(i, 12) for i in range(12)]  # one bar: 3 steps x 2 stages x 2 images
    m = res.manifests[1]
    assert [s["stage"] for s in m["stages"]] == ["base", "super_resolution"]
    assert m["stages"][0]["width"] == 8 and m["stages"][1]["width"] == 16 and m["stages"][1]["noise_level"] == 50
    assert any(k.startswith("base/unet/") for k in m["model"]["files"]) and any(k.startswith("sr/unet/") for k in m["model"]["files"])
    alone = generate(cascade, make_request(prompt="red apple", seed=6, steps=3))
    assert torch.equal(res.latents[1:2], alone.latents)  # image i of a batch is its seed's image
    again = generate(cascade, make_request(prompt="red apple", seed=5, steps=3, batch=2))
    assert torch.equal(res.latents, again.latents)


def test_cascade_output_depends_on_its_base_image(cascade):
    """The SR stage is conditioned on the base's image: another prompt changes the base and so the output."""
    a = generate(cascade, make_request(prompt="red apple", seed=5, steps=3))
    b = generate(cascade, make_request(prompt="blue car", seed=5, steps=3))
    assert not torch.equal(a.latents, b.latents)


def test_cascade_refuses_inputs_it_cannot_use(cascade):
    with pytest.raises(InvalidRequestError, match="is a cascade"):
        generate(cascade, make_request(prompt="x", steps=2, init_image=encode_image(_rgba(16, 16))))
    with pytest.raises(InvalidRequestError, match="cascade's factor"):
        generate(cascade, make_request(prompt="x", steps=2, width=18, height=16))


def test_cascade_cli_assembles_checks_and_generates(cascade_dir, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["cascade", str(cascade_dir / "base"), str(cascade_dir / "sr"), "-o", str(out), "--name", "mine"]) == 0
    assert json.loads((out / "dreamlab.json").read_text())["cascade"] == {"base": "base", "sr": "sr"}
    assert load_model(out).name == "mine"
    img = tmp_path / "img.png"
    assert main(["generate", "red apple", "--model", str(out), "-o", str(img), "--seed", "1", "--steps", "2", "-q"]) == 0
    assert Image.open(img).size == (16, 16)
    assert main(["replay", str(img), "-o", str(tmp_path / "again.png")]) == 0
    capsys.readouterr()
    # the stages swapped: refused when assembling, and nothing is left behind
    assert main(["cascade", str(cascade_dir / "sr"), str(cascade_dir / "base"), "-o", str(tmp_path / "bad")]) == 2
    assert "must be a text-to-image model" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / ".tmp-bad").exists()
    assert main(["cascade", str(cascade_dir / "base"), str(cascade_dir / "sr"), "-o", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_cascade_folder_cannot_point_outside_itself(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "dreamlab.json").write_text(json.dumps({"cascade": {"base": "../elsewhere", "sr": "sr"}}))
    with pytest.raises(DreamlabError, match="cascade.base"):
        load_model(root)


# ------------------------------------------------------------------------------------------- training


def test_both_stages_of_a_cascade_train_and_run(tmp_path):
    from dreamlab.train.unet import UNetConfig, train_unet

    tiny = dict(data=str(FIXTURE), vae=str(make_tiny_vae(tmp_path / "vae")), batch_size=2, block_out_channels=(32, 32),
                captions_per_image=1, log_every=1, ckpt_every=2, sample_every=2, device="cpu", steps=2)
    base = train_unet(UNetConfig(out=str(tmp_path / "base"), resolution=32, **tiny))
    stage = train_unet(UNetConfig(out=str(tmp_path / "sr"), sr_from=32, **tiny))
    assert (tmp_path / "sr" / "samples-0000002.png").exists()  # the SR grid: real, low-res, enlarged rows
    spec = json.loads((stage / "dreamlab.json").read_text())
    assert spec["super_resolution"] == {"from_size": 32, "noise_level": 50} and spec["sample_size"] == 64
    b, s = load_model(base), load_model(stage)
    assert b.sample_size == 32 and b.unet.config.sample_size == 8 and b.sr is None
    assert s.unet.config.in_channels == 8 and s.sr.from_size == 32
    img = tmp_path / "apple.png"
    assert main(["cascade", str(base), str(stage), "-o", str(tmp_path / "cascade")]) == 0
    assert main(["generate", "red apple", "--model", str(tmp_path / "cascade"), "-o", str(img), "--steps", "2", "-q"]) == 0
    assert Image.open(img).size == (64, 64)
    with pytest.raises(DreamlabError, match="--sr-from 48"):
        train_unet(UNetConfig(out=str(tmp_path / "bad"), sr_from=48, **tiny))
    with pytest.raises(DreamlabError, match="--resolution 36"):
        train_unet(UNetConfig(out=str(tmp_path / "bad"), resolution=36, **tiny))
