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


def _source(tmp_path):
    src = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA")
    src.save(tmp_path / "src.png")
    return src


def _outpaint(tiny, src, **spec):
    return generate(tiny, make_request(prompt="red apple", seed=0, steps=3, init_image=encode_image(src), outpaint=spec))


def test_outpainting_keeps_the_known_region(tiny_dir, tmp_path):
    """The default blends a band of 4 pixels on the known side of each seam; the rest of the known
    region is the source exactly, and with --blend 0 all of it is."""
    src = np.asarray(_source(tmp_path)).astype(int)
    out = tmp_path / "out.png"
    assert main(["outpaint", str(tmp_path / "src.png"), "--left", "8", "--right", "8", "-p", "red apple",
                 "--model", str(tiny_dir), "--steps", "3", "--seed", "0", "-o", str(out)]) == 0
    got = np.asarray(Image.open(out)).astype(int)
    assert got.shape == (16, 32, 4) and np.array_equal(got[:, 8 + 4:24 - 4], src[:, 4:12])
    # the band: changed, less the deeper it lies (weights 4/5 .. 1/5 of the decoded image)
    depth = [float(np.abs(got[:, 8 + k] - src[:, k]).mean() + np.abs(got[:, 23 - k] - src[:, 15 - k]).mean()) for k in range(4)]
    assert depth[0] > depth[3] > 0 and all(a >= b for a, b in zip(depth, depth[1:]))
    assert main(["outpaint", str(tmp_path / "src.png"), "--top", "4", "--blend", "0", "--model", str(tiny_dir),
                 "--steps", "3", "--seed", "0", "-o", str(out)]) == 0
    got = np.asarray(Image.open(out)).astype(int)
    assert got.shape == (20, 16, 4) and np.array_equal(got[4:], src)


def test_the_blend_band_and_the_strength_ramp():
    from dreamlab.compose.feather import feather_weight
    from dreamlab.compose.outpaint import Canvas

    geo = Canvas(8, 8, left=4, top=0, right=0, bottom=2)  # a 12 x 10 canvas
    inside = torch.from_numpy(geo.inside().astype(np.float32))
    w = feather_weight(inside, 2)
    assert w.shape == (10, 12) and bool((w[:, :4] == 1).all()) and bool((w[8:] == 1).all())
    assert w[3, 4:7].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])  # 2 pixels from the left seam, then exact
    assert w[6:8, 8].tolist() == pytest.approx([1 / 3, 2 / 3])  # and from the bottom one
    assert float(w[:6, 6:].abs().max()) == 0.0  # the right and top sides were not extended: no band there
    s = geo.strength(ramp=4, floor=0.2)[0, 0]
    assert float(s[:8, 4:].abs().max()) == 0.0 and s[0, :4].tolist() == pytest.approx([1.0, 0.8, 0.6, 0.4])
    assert bool((geo.strength(ramp=0, floor=0.2)[0, 0][:, :4] == 1).all())  # no ramp: free at once


def test_replacement_outpainting_is_inpainting_on_the_grown_canvas(tiny, tmp_path):
    """fill transparent, ramp 0, blend 0: the outpainting of before (the image on a transparent canvas,
    the new area as an inpainting mask, the known pixels pasted back), bit for bit."""
    src = _source(tmp_path)
    canvas = Image.new("RGBA", (32, 16), (0, 0, 0, 0))
    canvas.paste(src, (8, 0))
    mask = Image.new("L", (32, 16), 255)
    mask.paste(0, (8, 0, 24, 16))
    inpainted = generate(tiny, make_request(prompt="red apple", seed=0, steps=3, width=32, height=16, window=16, strength=1.0,
                                            init_image=encode_image(canvas), mask_image=encode_image(mask)))
    replaced = _outpaint(tiny, src, left=8, right=8, fill="transparent", ramp=0, blend=0)
    assert torch.equal(replaced.pixels, inpainted.pixels)
    assert not torch.equal(_outpaint(tiny, src, left=8, right=8).pixels, inpainted.pixels)


@pytest.mark.parametrize("spec", [{"resample": 1}, {"harmonize": 0.5}, {"fill": "transparent", "ramp": 8, "min_strength": 0.0}])
def test_every_seam_method_keeps_the_core_known_region(tiny, tmp_path, spec):
    src = _source(tmp_path)
    res = _outpaint(tiny, src, left=8, top=4, blend=2, **{"ramp": 4, **spec})  # a short ramp: every step is run
    got = np.asarray(res.images[0])
    assert got.shape == (20, 24, 4) and np.array_equal(got[4 + 2:, 8 + 2:], np.asarray(src)[2:, 2:])
    assert not np.array_equal(got, np.asarray(_outpaint(tiny, src, left=8, top=4, blend=2, ramp=4).images[0]))


def test_bad_outpainting_requests(tiny, tmp_path):
    src = encode_image(_source(tmp_path))
    with pytest.raises(InvalidRequestError, match="at least one of left, top, right, bottom"):
        generate(tiny, make_request(prompt="a", init_image=src, outpaint={}))
    with pytest.raises(InvalidRequestError, match="give the image to extend as init_image"):
        generate(tiny, make_request(prompt="a", outpaint={"left": 8}))
    with pytest.raises(InvalidRequestError, match="no mask_image"):
        generate(tiny, make_request(prompt="a", init_image=src, mask_image=src, outpaint={"left": 8}))
    with pytest.raises(InvalidRequestError, match="the canvas is 24x16"):
        generate(tiny, make_request(prompt="a", init_image=src, width=32, outpaint={"left": 8}))
    with pytest.raises(InvalidRequestError, match="size 19x16 is not divisible"):
        generate(tiny, make_request(prompt="a", init_image=src, outpaint={"left": 3}))
    with pytest.raises(InvalidRequestError, match="outpaint.resample"):
        make_request(prompt="a", init_image=src, outpaint={"left": 8, "resample": 99})


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
