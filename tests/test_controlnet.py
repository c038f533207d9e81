"""ControlNet: made from the model's UNet, a per-step model wrapper, its invariants (zero convolutions and
scale 0 change nothing; residuals add up), training through the shared loss, the CLI, replay, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dreamlab.cli import main
from dreamlab.control.conditions import canny, get_condition, silhouette
from dreamlab.control.controlnet import ControlNetControl
from dreamlab.core.types import Cond
from dreamlab.errors import DreamlabError, InvalidRequestError, UnknownNameError
from dreamlab.generate import encode_image, generate, make_request
from dreamlab.loading.model import load_model
from dreamlab.metadata import read_manifest
from dreamlab.models.controlnet import controlnet_from_unet, save_controlnet


def _edges_png(path, size=16):
    a = np.zeros((size, size), np.uint8)
    lo, hi = size // 5, size - size // 5
    a[lo:hi, lo] = a[lo:hi, hi - 1] = a[lo, lo:hi] = a[hi - 1, lo:hi] = 255
    Image.fromarray(a, "L").save(path)
    return path


@pytest.fixture
def model(tiny_dir):
    return load_model(tiny_dir)  # its own bundle: ControlNets attached here do not reach other tests


def _controlnet(model, folder, condition="canny", perturb=False):
    net = controlnet_from_unet(model.unet, get_condition(condition).channels, model.space.factor)
    if perturb:  # as if trained: the zero convolutions carry something
        torch.manual_seed(1)
        for p in [*net.controlnet_down_blocks.parameters(), *net.controlnet_mid_block.parameters()]:
            torch.nn.init.normal_(p, std=0.5)
    return save_controlnet(net, folder, condition, model.files, model.name, {"steps": 0})


def _req(control_png, **control):
    return make_request(prompt="red apple", seed=3, steps=4,
                        controls=[{"condition": "canny", "image": encode_image(control_png), **control}])


def test_a_fresh_controlnet_and_scale_0_change_nothing(model, tmp_path):
    plain = generate(model, make_request(prompt="red apple", seed=3, steps=4)).pixels
    model.use_controlnet(_controlnet(model, tmp_path / "fresh"))
    edges = _edges_png(tmp_path / "edges.png")
    assert torch.equal(generate(model, _req(edges)).pixels, plain)  # zero convolutions: exactly nothing added
    model.use_controlnet(_controlnet(model, tmp_path / "trained", perturb=True))
    assert not torch.equal(generate(model, _req(edges)).pixels, plain)
    assert torch.equal(generate(model, _req(edges, scale=0.0)).pixels, plain)
    assert torch.equal(generate(model, _req(edges, start=0.5, end=0.5)).pixels, plain)  # no step inside [start, end]


def test_two_controls_at_a_and_0_equal_one_at_a(model, tmp_path):
    model.use_controlnet(_controlnet(model, tmp_path / "c", perturb=True))
    edges, other = _edges_png(tmp_path / "e.png"), _edges_png(tmp_path / "o.png", size=8)
    one = generate(model, _req(edges, scale=0.7)).pixels
    both = make_request(prompt="red apple", seed=3, steps=4, controls=[
        {"condition": "canny", "image": encode_image(edges), "scale": 0.7},
        {"condition": "canny", "image": encode_image(other), "scale": 0.0}])
    assert torch.equal(generate(model, both).pixels, one)
    added = make_request(prompt="red apple", seed=3, steps=4, controls=[
        {"condition": "canny", "image": encode_image(edges), "scale": 0.7},
        {"condition": "canny", "image": encode_image(edges), "scale": 0.3}])
    assert not torch.equal(generate(model, added).pixels, one)


def test_the_controlnet_trains_through_the_shared_loss(model):
    net = controlnet_from_unet(model.unet, 1, model.space.factor).train()
    torch.nn.init.normal_(net.controlnet_mid_block.weight, std=0.01)  # a little signal past the zeros
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t, hint = torch.tensor([100, 300, 500, 700]), (torch.rand(4, 1, 16, 16, generator=g) > 0.7).float()
    cond = model.encode_prompts(["red apple"] * 4)
    base = model.denoiser()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        denoiser = type(base)(base.model, base.schedule, base.prediction, wrappers=(ControlNetControl(net, base.model, hint),))
        loss = denoiser.loss(x0, noise, t, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.unet.parameters())  # the base stays frozen


def test_conditions_from_pictures():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[4:12, 4:12] = (200, 30, 30, 255)
    sil = silhouette(rgba)[..., 0]
    assert sil.sum() == 64 and sil[8, 8] == 1 and sil[0, 0] == 0
    edges = canny(rgba)[..., 0]
    assert edges[4:12, 4:12].sum() > 0 and edges[7:9, 7:9].sum() == 0 and edges[0:2].sum() == 0


def test_cli_control_replay_and_resize_note(model, tiny_dir, tmp_path, capsys):
    folder = _controlnet(model, tmp_path / "cn", perturb=True)
    edges = _edges_png(tmp_path / "edges.png", size=32)  # another size: resized, and said so
    out = tmp_path / "c.png"
    args = ["generate", "red apple", "--model", str(tiny_dir), "--controlnet", str(folder), "--control", f"canny:{edges}",
            "--control-scale", "0.8", "--seed", "2", "--steps", "3", "-q", "-o", str(out)]
    assert main(args) == 0
    assert "resized to 16x16" in capsys.readouterr().err
    m = read_manifest(out)
    assert m["request"]["controls"][0]["image"].startswith("sha256:") and m["adapters"][0]["kind"] == "controlnet"
    assert main(["replay", str(out), "-o", str(tmp_path / "r.png")]) == 2
    assert "pass it with --image-file FILE" in capsys.readouterr().err
    assert main(["replay", str(out), "--control-image", str(edges), "-o", str(tmp_path / "r.png")]) == 0
    assert "identical" in capsys.readouterr().out


def test_bad_control_input_gets_one_line(model, tiny, tmp_path):
    with pytest.raises(UnknownNameError, match="unknown control condition 'depth'; known: canny, shape"):
        make_request(prompt="a", controls=[{"condition": "depth", "image": "aGk="}])
    with pytest.raises(InvalidRequestError, match="no ControlNet for 'canny' is installed"):
        generate(model, _req(_edges_png(tmp_path / "e.png")))
    model.use_controlnet(_controlnet(model, tmp_path / "cn"))
    bad = make_request(prompt="a", controls=[{"condition": "canny", "image": "bm90IGFuIGltYWdl"}])
    with pytest.raises(InvalidRequestError, match="controls.0.image is not a readable image"):
        generate(model, bad)
    other = load_model(_other_model(tmp_path))
    with pytest.raises(DreamlabError, match="was made for another UNet"):
        other.use_controlnet(tmp_path / "cn")


def _other_model(tmp_path):
    from dreamlab.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path / "other", seed=5)


def test_controls_work_with_img2img_and_inpainting(model, tmp_path):
    model.use_controlnet(_controlnet(model, tmp_path / "cn", perturb=True))
    edges = encode_image(_edges_png(tmp_path / "e.png"))
    source = encode_image(Image.new("RGBA", (16, 16), (200, 40, 40, 255)))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    for extra in ({"init_image": source, "strength": 0.6},
                  {"init_image": source, "mask_image": encode_image(Image.fromarray(mask, "L")), "strength": 1.0}):
        plain = generate(model, make_request(prompt="red apple", seed=1, steps=4, **extra))
        controlled = generate(model, make_request(prompt="red apple", seed=1, steps=4, **extra,
                                                  controls=[{"condition": "canny", "image": edges}]))
        assert not torch.equal(plain.pixels, controlled.pixels)
        if "mask_image" in extra:  # the known pixels stay the source's
            keep = torch.from_numpy(mask == 0)
            assert torch.equal(plain.pixels[0][:, keep], controlled.pixels[0][:, keep])


def test_fidelity_metrics_on_known_maps():
    from dreamlab.eval.control import edge_f1, iou

    a = np.zeros((16, 16), bool)
    a[4, 2:14] = True
    assert edge_f1(a, a) == 1.0
    shifted = np.roll(a, 1, axis=0)  # one pixel off: inside the tolerance
    assert edge_f1(a, shifted) == 1.0 and edge_f1(a, np.roll(a, 3, axis=0)) == 0.0
    half = a.copy()
    half[4, 8:] = False  # precision 1; recall 7/12 (the tolerance reaches one pixel past the cut)
    assert edge_f1(a, half) == pytest.approx(2 * (7 / 12) / (1 + 7 / 12))
    assert iou(a, half) == pytest.approx(0.5)


def test_dreamlab_eval_scores_a_controlnet_over_scales(model, tiny_dir, tmp_path, capsys):
    import json
    from pathlib import Path

    from dreamlab.cli import main

    folder = _controlnet(model, tmp_path / "cn", condition="shape", perturb=True)
    fixture = Path(__file__).parent / "fixtures" / "emoji"
    out = tmp_path / "scores.json"
    assert main(["eval", "--model", str(tiny_dir), "--controlnet", str(folder), "--data", str(fixture), "--prompts", "3",
                 "--steps", "2", "--control-scales", "0,1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "shape at scale 0: silhouette IoU" in text and "shape at scale 1:" in text
    scores = json.loads(out.read_text())
    assert sorted(scores) == ["0", "1"] and all(s["n"] == 3 for s in scores.values())
    assert main(["eval", "--model", str(tiny_dir), "--controlnet", str(folder), "--control-scales", "a"]) == 2
