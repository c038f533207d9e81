"""`dreamlab replay`: bit-identical regeneration from a PNG's manifest, named model-file differences, and
img2img / inpainting input files verified by the sha256 of their bytes that the manifest records."""

import base64
import hashlib
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from dreamlab.cli import main
from dreamlab.generate import generate, make_request
from dreamlab.loading.model import load_model
from dreamlab.metadata import read_manifest, save_png
from dreamlab.errors import DreamlabError, IntegrityError
from dreamlab.replay import compare_pixels, diff_model_files, resolve_input


def source_file(path, size=16):
    arr = np.random.default_rng(1).integers(0, 256, (size, size, 4), dtype=np.uint8)
    arr[..., 3] = 255
    Image.fromarray(arr, "RGBA").save(path)
    return path


def mask_file(path, size=16):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask, "L").save(path)
    return path


def test_cli_generated_batch_image_replays_identically(tiny_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    argv = ["generate", "red apple", "-o", str(out), "--model", str(tiny_dir), "--seed", "5", "--steps", "4",
            "--batch", "2", "--sampler", "dpmpp_2m_sde", "--negative", "blurry", "-q"]
    assert main(argv) == 0
    capsys.readouterr()
    # image 1 of a batch: its manifest says seed 6, batch 1, and the recorded model folder is used
    assert main(["replay", str(tmp_path / "img-1.png"), "-o", str(tmp_path / "again.png")]) == 0
    text = capsys.readouterr().out
    assert "identical: all 256 pixels match" in text and "differs" not in text
    a, b = (np.asarray(Image.open(tmp_path / name)) for name in ("img-1.png", "again.png"))
    assert np.array_equal(a, b)
    assert read_manifest(tmp_path / "again.png")["request"] == read_manifest(tmp_path / "img-1.png")["request"]


def test_a_changed_model_is_named_file_by_file(tiny_dir, tiny, tmp_path, capsys):
    res = generate(tiny, make_request(prompt="a cat", steps=3, seed=2))
    image = save_png(res.images[0], tmp_path / "cat.png", res.manifests[0])
    changed = tmp_path / "changed"
    shutil.copytree(tiny_dir, changed)
    from safetensors.torch import load_file, save_file

    weights = changed / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_out.bias"] = state["conv_out.bias"] + 0.5
    save_file(state, weights, metadata={"format": "pt"})
    (changed / "tokenizer" / "tokenizer.json").unlink()
    (changed / "notes.txt").write_text("added later\n")

    rc = main(["replay", str(image), "--model", str(changed), "-o", str(tmp_path / "again.png")])
    captured = capsys.readouterr()
    assert rc == 1
    assert "changed: unet/diffusion_pytorch_model.safetensors" in captured.out
    assert "missing: tokenizer/tokenizer.json" in captured.out
    assert "added:   notes.txt" in captured.out
    assert "different: " in captured.out and " of 256 pixels differ" in captured.out
    assert "likely cause: the model files changed" in captured.err


def test_img2img_from_the_cli_needs_and_verifies_its_source(tiny_dir, tmp_path, capsys):
    src = source_file(tmp_path / "src.png")
    out = tmp_path / "edit.png"
    assert main(["generate", "x", "-o", str(out), "--model", str(tiny_dir), "--init-image", str(src),
                 "--strength", "0.6", "--seed", "1", "--steps", "5", "-q"]) == 0
    capsys.readouterr()
    assert main(["replay", str(out), "-o", str(tmp_path / "r.png")]) == 2
    assert "pass it with --init-image FILE" in capsys.readouterr().err
    other = source_file(tmp_path / "other.png", size=8)
    assert main(["replay", str(out), "--init-image", str(other), "-o", str(tmp_path / "r.png")]) == 2
    assert "is not the init image this image was made from" in capsys.readouterr().err
    assert main(["replay", str(out), "--init-image", str(src), "-o", str(tmp_path / "r.png")]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["replay", str(out), "--init-image", str(src), "--mask", str(src), "-o", str(tmp_path / "r.png")]) == 2
    assert "was not made with a mask" in capsys.readouterr().err


def test_img2img_from_the_cli_with_a_jpeg_replays_from_the_same_file(tiny_dir, tmp_path, capsys):
    Image.open(source_file(tmp_path / "src.png")).convert("RGB").save(tmp_path / "src.jpg", quality=90)
    out = tmp_path / "edit.png"
    assert main(["generate", "x", "-o", str(out), "--model", str(tiny_dir), "--init-image", str(tmp_path / "src.jpg"),
                 "--seed", "1", "--steps", "3", "-q"]) == 0
    capsys.readouterr()
    assert main(["replay", str(out), "--init-image", str(tmp_path / "src.jpg"), "-o", str(tmp_path / "r.png")]) == 0


def test_inpainting_sent_as_raw_file_bytes_replays_from_the_files(tiny, tmp_path, capsys):
    """What the HTTP API and web UI send: base64 of the files' own bytes (a JPEG source here)."""
    Image.open(source_file(tmp_path / "src.png")).convert("RGB").save(tmp_path / "src.jpg", quality=90)
    mask = mask_file(tmp_path / "mask.png")
    raw = {name: base64.b64encode((tmp_path / name).read_bytes()).decode() for name in ("src.jpg", "mask.png")}
    res = generate(tiny, make_request(prompt="x", init_image=raw["src.jpg"], mask_image=raw["mask.png"], strength=1.0, seed=9, steps=4))
    for key, name in (("init_image", "src.jpg"), ("mask_image", "mask.png")):  # = sha256sum FILE
        assert res.manifests[0]["request"][key] == "sha256:" + hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    image = save_png(res.images[0], tmp_path / "inpainted.png", res.manifests[0])
    assert main(["replay", str(image), "--init-image", str(tmp_path / "src.jpg"), "-o", str(tmp_path / "r.png")]) == 2
    assert "pass it with --mask FILE" in capsys.readouterr().err
    rc = main(["replay", str(image), "--init-image", str(tmp_path / "src.jpg"), "--mask", str(mask), "-o", str(tmp_path / "r.png")])
    assert rc == 0 and "identical" in capsys.readouterr().out


def test_an_input_is_checked_by_its_bytes_alone(tiny, tmp_path, capsys):
    """A data: URL and plain base64 of one file record the same hash; a file with the same pixels but other
    bytes is not the recorded input."""
    src = source_file(tmp_path / "src.png")
    raw = base64.b64encode(src.read_bytes()).decode()
    digest = "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    res = generate(tiny, make_request(prompt="x", init_image="data:image/png;base64," + raw, strength=0.5, seed=1, steps=3))
    assert res.manifests[0]["request"]["init_image"] == digest
    image = save_png(res.images[0], tmp_path / "edit.png", res.manifests[0])

    same_pixels = tmp_path / "same-pixels.png"
    Image.open(src).save(same_pixels, compress_level=1)
    assert same_pixels.read_bytes() != src.read_bytes()
    assert np.array_equal(np.asarray(Image.open(same_pixels)), np.asarray(Image.open(src)))
    assert main(["replay", str(image), "--init-image", str(same_pixels), "-o", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err
    assert "is not the init image this image was made from" in err and digest in err
    assert main(["replay", str(image), "--init-image", str(src), "-o", str(tmp_path / "r.png")]) == 0
    assert "identical" in capsys.readouterr().out

    assert resolve_input(digest, str(src), "init image", "--init-image") == raw
    assert resolve_input("inline-base64", None, "init image", "--init-image") == "inline-base64"
    with pytest.raises(IntegrityError):
        resolve_input(digest, str(same_pixels), "init image", "--init-image")
    with pytest.raises(DreamlabError, match="cannot read"):
        resolve_input(digest, str(tmp_path / "missing.png"), "init image", "--init-image")


def test_replay_errors_are_one_line(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    assert main(["replay", str(plain), "-o", str(tmp_path / "o.png")]) == 2
    assert "carries no dreamlab manifest" in capsys.readouterr().err
    assert main(["replay", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o.png")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_missing_model_folder_says_so(tiny, tmp_path, capsys):
    res = generate(tiny, make_request(prompt="x", steps=1, seed=1))
    manifest = {**res.manifests[0], "model": {**res.manifests[0]["model"], "source": str(tmp_path / "gone")}}
    image = save_png(res.images[0], tmp_path / "x.png", manifest)
    assert main(["replay", str(image), "-o", str(tmp_path / "o.png")]) == 2
    assert "no model at" in capsys.readouterr().err


def test_diff_and_compare_helpers():
    d = diff_model_files({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "9", "d": "4"})
    assert (d.changed, d.missing, d.added) == (["b"], ["c"], ["d"]) and d
    assert not diff_model_files({"a": "1"}, {"a": "1"})
    x = np.zeros((2, 3, 4), dtype=np.uint8)
    y = x.copy()
    y[1, 2, 3] = 7
    assert compare_pixels(Image.fromarray(x), Image.fromarray(y)) == (1, 6, 7)
    assert compare_pixels(Image.fromarray(x), Image.fromarray(x[:1]))[0] == -1


def test_a_server_made_inpainting_replays_from_the_inputs_the_server_kept(tiny, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from dreamlab.server.app import create_app

    src, mask = source_file(tmp_path / "src.png"), mask_file(tmp_path / "mask.png")
    body = {"prompt": "x", "steps": 3, "seed": 4, "strength": 0.9,
            "init_image": base64.b64encode(src.read_bytes()).decode(),
            "mask_image": "data:image/png;base64," + base64.b64encode(mask.read_bytes()).decode()}
    with TestClient(create_app(tiny, tmp_path / "data", ui=False)) as client:
        job_id = client.post("/api/jobs", json=body).json()["id"]
        for _ in range(600):
            job = client.get(f"/api/jobs/{job_id}").json()
            if job["state"] == "done":
                break
            time.sleep(0.02)
        (tmp_path / "made.png").write_bytes(client.get(job["images"][0]["url"]).content)
        for key in ("init_image", "mask_image"):
            digest = job["request"][key].removeprefix("sha256:")
            (tmp_path / f"{key}.png").write_bytes(client.get(f"/api/inputs/{digest}").content)
    rc = main(["replay", str(tmp_path / "made.png"), "--init-image", str(tmp_path / "init_image.png"),
               "--mask", str(tmp_path / "mask_image.png"), "-o", str(tmp_path / "again.png")])
    assert rc == 0 and "identical" in capsys.readouterr().out


def test_an_outpainting_replays_from_the_image_it_extended(tiny_dir, tmp_path, capsys):
    """The manifest records the given image (by the sha256 of its file), not the grown canvas, so the
    file the user has is the one replay asks for; RePaint's noise is the image's own, so it replays too."""
    src = source_file(tmp_path / "src.png")
    out = tmp_path / "wide.png"
    assert main(["outpaint", str(src), "--left", "8", "--bottom", "4", "--resample", "1", "--ramp", "4", "-p", "x", "--model", str(tiny_dir),
                 "--steps", "3", "--seed", "2", "-o", str(out)]) == 0
    capsys.readouterr()
    recorded = read_manifest(out)["request"]
    assert recorded["init_image"] == "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    assert recorded["outpaint"]["left"] == 8 and recorded["outpaint"]["blend"] == 4 and recorded["outpaint"]["resample"] == 1
    assert main(["replay", str(out), "-o", str(tmp_path / "again.png")]) == 2
    assert "pass it with --init-image FILE" in capsys.readouterr().err
    assert main(["replay", str(out), "--init-image", str(src), "-o", str(tmp_path / "again.png")]) == 0
    assert "identical" in capsys.readouterr().out


def test_a_server_made_outpainting_replays(tiny, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from dreamlab.server.app import create_app

    src = source_file(tmp_path / "src.png")
    body = {"prompt": "x", "steps": 3, "seed": 4, "init_image": base64.b64encode(src.read_bytes()).decode(),
            "outpaint": {"right": 8, "harmonize": 0.5}}
    with TestClient(create_app(tiny, tmp_path / "data", ui=False)) as client:
        job_id = client.post("/api/jobs", json=body).json()["id"]
        for _ in range(600):
            job = client.get(f"/api/jobs/{job_id}").json()
            if job["state"] in ("done", "failed"):
                break
            time.sleep(0.02)
        assert job["state"] == "done", job
        (tmp_path / "made.png").write_bytes(client.get(job["images"][0]["url"]).content)
    assert Image.open(tmp_path / "made.png").size == (24, 16)
    rc = main(["replay", str(tmp_path / "made.png"), "--init-image", str(src), "-o", str(tmp_path / "again.png")])
    assert rc == 0 and "identical" in capsys.readouterr().out
