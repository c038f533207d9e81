"""Composition: windows, regions, illusions, layered collages, outpainting and ILVR, with their
invariants (the degenerate case of each is plain generation, bit for bit) and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dreamlab.cli import main
from dreamlab.errors import DreamlabError, InvalidRequestError
from dreamlab.generate import encode_image, generate, make_request

BASE = dict(prompt="red apple", seed=4, steps=4)


def _plain(tiny, **kw):
    return generate(tiny, make_request(**{**BASE, **kw})).pixels


def test_one_window_one_region_and_the_identity_view_are_plain_generation(tiny):
    plain = _plain(tiny)
    assert torch.equal(_plain(tiny, window=16), plain)
    assert torch.equal(_plain(tiny, regions=[{"prompt": "red apple", "box": [0, 0, 16, 16]}], prompt="a picnic"), plain)
    assert torch.equal(_plain(tiny, illusion={"prompts": ["red apple"], "views": ["identity"]}), plain)


def test_windows_and_regions_on_a_larger_canvas(tiny):
    wide = _plain(tiny, width=32, height=16, window=16, window_stride=8)
    assert wide.shape[-1] == 32
    regional = _plain(tiny, width=32, height=16, window=16, regions=[{"prompt": "green apple", "box": [0, 0, 16, 16]}])
    assert not torch.equal(regional, wide)
    # the region changes what it covers far more than the rest (windows carry a little across its border)
    diff = (regional - wide).abs()
    assert float(diff[..., :16].mean()) > 3 * float(diff[..., 24:].mean())


def test_an_illusion_averages_its_views(tiny):
    a = _plain(tiny, illusion={"prompts": ["red apple", "cat face"], "views": ["identity", "rotate180"]})
    assert a.shape == _plain(tiny).shape and not torch.equal(a, _plain(tiny))


def _layout(tmp_path, **over):
    star = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    star.paste((250, 200, 0, 255), (2, 2, 6, 6))
    star.save(tmp_path / "star.png")
    layout = {"width": 32, "height": 32, "prompt": "a picnic",
              "layers": [{"prompt": "a red apple", "box": [0, 8, 16, 24]}, {"prompt": "a slice of pizza", "box": [16, 8, 32, 24]},
                         {"prompt": "a star", "image": "star.png", "box": [12, 0, 20, 8], "strength": 0.3}], **over}
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    return tmp_path / "layout.json"


def test_collage_layers_are_transparent_outside_and_restack_to_the_collage(tiny_dir, tmp_path):
    layout = _layout(tmp_path)
    assert main(["collage", str(layout), "--model", str(tiny_dir), "--steps", "4", "--seed", "1", "-o", str(tmp_path / "s.png"),
                 "--layers-dir", str(tmp_path / "layers")]) == 0
    layers = [np.asarray(Image.open(tmp_path / "layers" / f"layer-{k:02d}.png")) for k in range(3)]
    boxes = [(0, 8, 16, 24), (16, 8, 32, 24), (12, 0, 20, 8)]
    for arr, (x0, y0, x1, y1) in zip(layers, boxes):
        outside = np.ones(arr.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        assert (arr[..., 3][outside] == 0).all()
    stack = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    for k in range(3):
        stack = Image.alpha_composite(stack, Image.open(tmp_path / "layers" / f"layer-{k:02d}.png"))
    assert np.array_equal(np.asarray(stack), np.asarray(Image.open(tmp_path / "layers" / "collage.png")))
    assert Image.open(tmp_path / "s.png").size == (32, 32)
    assert json.loads((tmp_path / "layers" / "layout.json").read_text())["layers"][2]["rendered"] == "layer-02.png"


@pytest.mark.parametrize("change,message", [
    ({"layers": [{"prompt": "a", "box": [0, 0, 40, 8]}]}, "layers.0.box [0, 0, 40, 8] reaches outside the 32x32 canvas"),
    ({"layers": [{"prompt": "a", "image": "missing.png", "box": [0, 0, 8, 8]}]}, "layers.0.image: cannot read"),
    ({"layers": [{"prompt": "a", "box": [0, 0, 8, 8]}] * 9}, "layers: List should have at most 8 items"),
    ({"width": 33}, "not divisible by the model's factor"),
])
def test_bad_layouts_get_one_line(tiny_dir, tmp_path, capsys, change, message):
    layout = _layout(tmp_path, **change)
    assert main(["collage", str(layout), "--model", str(tiny_dir), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_outpainting_keeps_the_known_region(tiny_dir, tmp_path):
    src = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA")
    src.save(tmp_path / "src.png")
    out = tmp_path / "out.png"
    assert main(["outpaint", str(tmp_path / "src.png"), "--left", "8", "--right", "8", "-p", "red apple",
                 "--model", str(tiny_dir), "--steps", "3", "--seed", "0", "-o", str(out)]) == 0
    got = np.asarray(Image.open(out))
    assert got.shape == (16, 32, 4) and np.array_equal(got[:, 8:24], np.asarray(src))


def _down(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(t, n)


def test_ilvr_follows_the_reference_low_frequencies(tiny):
    """In latent space, where ILVR acts (the tiny model's random autoencoder does not carry it to pixels;
    docs/composition.md measures the default model in pixels)."""
    ref = Image.new("RGBA", (16, 16), (230, 30, 30, 255))
    ref.paste((30, 30, 230, 255), (0, 8, 16, 16))
    px = torch.from_numpy(np.array(ref)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        ref_lat = tiny.space.encode(px)
    f = tiny.space.factor
    free = generate(tiny, make_request(**BASE)).latents
    spread = {}
    for n in (4, 8):
        outs = [generate(tiny, make_request(**{**BASE, "seed": s}, ilvr={"reference": encode_image(ref), "factor": n})).latents
                for s in range(3)]
        for o in outs:
            assert float((_down(o, n // f) - _down(ref_lat, n // f)).abs().mean()) < \
                0.1 * float((_down(free, n // f) - _down(ref_lat, n // f)).abs().mean())
        spread[n] = float(torch.stack(outs).std(0).mean())
    assert spread[8] > spread[4]  # a coarser factor leaves more to the sample


def test_bad_composition_requests(tiny):
    with pytest.raises(InvalidRequestError, match="regions.0.box .* reaches outside"):
        generate(tiny, make_request(**BASE, regions=[{"prompt": "a", "box": [0, 0, 99, 8]}]))
    with pytest.raises(InvalidRequestError, match="give a box or a mask"):
        generate(tiny, make_request(**BASE, regions=[{"prompt": "a"}]))
    with pytest.raises(DreamlabError, match="unknown view 'spin'"):
        make_request(**BASE, illusion={"prompts": ["a", "b"], "views": ["identity", "spin"]})
    with pytest.raises(InvalidRequestError, match="ilvr.factor 3"):
        generate(tiny, make_request(**BASE, ilvr={"reference": encode_image(Image.new("RGB", (16, 16))), "factor": 3}))
