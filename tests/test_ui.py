"""The Gradio UI without a browser: the ImageEditor value -> (source, mask) conversion, the form -> request
mapping, and the Generate handler through Gradio's own HTTP API in-process: it queues the job in the same
persistent job store as POST /api/jobs and streams progress, previews and the final images."""

import base64
import io
import json
import re
import socket
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dreamlab.errors import DreamlabError, InvalidRequestError
from dreamlab.loading.model import load_model
from dreamlab.models.tiny import make_tiny_model
from dreamlab.server.app import create_app
from dreamlab.server.ui import build_request, editor_inputs, png_b64
from dreamlab.server.ui_collage import EditorState, default_layout, layout_text

FORM = dict(mode="txt2img", prompt="red apple", negative_prompt="", sampler="euler", schedule="karras", steps=6,
            cfg_scale=5, seed=3, batch=2, width=16, height=16)


def rgba(size=(16, 12), seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    arr[..., 3] = 255
    return Image.fromarray(arr, "RGBA")


def test_the_mask_is_the_painted_layers_alpha_hard_edged():
    source = rgba()
    layer = np.zeros((12, 16, 4), dtype=np.uint8)
    layer[2:5, 3:9] = (255, 0, 255, 153)  # a stroke at 60% opacity
    layer[10, 15, 3] = 1  # the faint edge of a stroke still counts
    other = np.zeros((6, 8, 4), dtype=np.uint8)  # a layer at half size is scaled to the source
    other[5, 0, 3] = 255
    src, mask = editor_inputs({"background": source, "layers": [Image.fromarray(layer, "RGBA"), None, other], "composite": None})
    assert src is source and mask.mode == "L" and mask.size == (16, 12)
    m = np.asarray(mask)
    expected = np.zeros((12, 16), dtype=np.uint8)
    expected[2:5, 3:9] = 255
    expected[10, 15] = 255
    expected[10:12, 0:2] = 255
    assert np.array_equal(m, expected)


@pytest.mark.parametrize(
    "value,needle",
    [
        (None, "upload a source image first"),
        ({"background": None, "layers": [], "composite": None}, "upload a source image first"),
        ({"background": rgba(), "layers": [], "composite": None}, "paint the region to repaint"),
        ({"background": rgba(), "layers": [Image.new("RGBA", (16, 12))], "composite": None}, "paint the region"),
    ],
)
def test_an_unusable_editor_value_says_what_to_do(value, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        editor_inputs(value)


def test_the_form_becomes_a_request(tmp_path):
    req = build_request(**FORM)
    assert (req.prompt, req.sampler, req.steps, req.seed, req.batch, req.width, req.init_image) == ("red apple", "euler", 6, 3, 2, 16, None)
    assert build_request(**{**FORM, "seed": -1}).seed is None and build_request(**{**FORM, "seed": None}).seed is None

    path = tmp_path / "photo.jpg"
    rgba().convert("RGB").save(path, quality=90)
    req = build_request(**{**FORM, "mode": "img2img"}, init_path=str(path), img2img_strength=0.4)
    assert base64.b64decode(req.init_image) == path.read_bytes() and req.strength == 0.4 and req.mask_image is None

    layer = np.zeros((12, 16, 4), dtype=np.uint8)
    layer[:, 8:, 3] = 255
    editor = {"background": rgba(), "layers": [Image.fromarray(layer, "RGBA")], "composite": None}
    req = build_request(**{**FORM, "mode": "inpaint"}, editor=editor, inpaint_strength=0.9)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(req.mask_image))))
    assert req.strength == 0.9 and mask[:, :8].max() == 0 and mask[:, 8:].min() == 255
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(req.init_image)))), np.asarray(rgba()))

    req = build_request(**{**FORM, "mode": "upscale"}, lowres_path=str(path), noise_level=30)
    assert base64.b64decode(req.lowres_image) == path.read_bytes() and req.noise_level == 30
    assert req.width is None and req.height is None  # the output is the upload enlarged by the model's factor

    with pytest.raises(InvalidRequestError, match="image to image: upload a source image first"):
        build_request(**{**FORM, "mode": "img2img"})
    with pytest.raises(InvalidRequestError, match="upscale: upload the image to enlarge first"):
        build_request(**{**FORM, "mode": "upscale"})
    with pytest.raises(InvalidRequestError, match=r"^steps: .*; cfg_scale: ") as e:
        build_request(**{**FORM, "steps": 0, "cfg_scale": -1})
    assert "\n" not in str(e.value)
    with pytest.raises(DreamlabError, match="unknown sampler 'nope'"):
        build_request(**{**FORM, "sampler": "nope"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


# the form's edit, control and collage inputs, left empty (edit target, picture, blend words, reweight, auto mask,
# control image, condition, scale, preprocess, collage layout, collage editor)
NO_EXTRAS = ["", None, "", "", False, None, None, 1.0, False, '{"layers": []}', None, None, 1.5]


def call(client, data):
    """Gradio's HTTP API for the Generate button: its server-sent events as (name, data)."""
    r = client.post("/gradio_api/call/generate", json={"data": data})
    assert r.status_code == 200, r.text
    events, name = [], None
    with client.stream("GET", f"/gradio_api/call/generate/{r.json()['event_id']}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every name lookup or connection to anything but this machine."""
    attempts = []
    local = ("localhost", "127.0.0.1", "::1", "testserver", None)
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host not in local:
            attempts.append(host)
            raise socket.gaierror(f"no network in this test ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        if isinstance(address, tuple) and address[0] not in local:
            attempts.append(address)
            raise OSError(f"no network in this test ({address})")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def test_generate_queues_in_the_job_store_and_streams_progress(tiny, tmp_path, no_network):
    app = create_app(tiny, tmp_path / "data", preview_every=1)
    store = app.state.server.store
    store.set_progress = slowed(store.set_progress)
    with TestClient(app) as client:
        # prompt, negative, sampler, schedule, steps, cfg, seed, batch, width, height, init, strength, editor, strength,
        # lowres image, noise level
        events = call(client, ["red apple", "blurry", "euler", "karras", 6, 4, 3, 2, 16, 16, None, 0.75, None, 1.0, None, 0, *NO_EXTRAS])
        assert events[-1][0] == "complete"
        status = [e[0] for _, e in events]
        # progress runs over the whole batch: 2 images x 6 steps
        steps = [int(m[1]) for s in status if (m := re.search(r'<progress value="(\d+)" max="12">.*step \1 / 12', s))]
        assert steps and steps == sorted(steps), status
        assert any(isinstance(e[1], dict) and e[1].get("path", "").endswith(".png") for _, e in events[:-1]), "no preview"
        final = events[-1][1]
        assert "done: 2 images, seed 3, 4" in final[0] and final[3] is None
        assert [item["caption"] for item in final[2]] == ["red apple · 3", "red apple · 4"]

        (job,) = client.get("/api/jobs").json()["items"]  # the same queue and store as the API
        assert job["state"] == "done" and job["request"]["negative_prompt"] == "blurry" and job["request"]["cfg_scale"] == 4
        for item, image in zip(final[2], job["images"], strict=True):
            shown = np.asarray(Image.open(item["image"]["path"]))
            assert np.array_equal(shown, np.asarray(Image.open(io.BytesIO(client.get(image["url"]).content))))

        # the server's limits apply, as for POST /api/jobs: an error event, no job
        events = call(client, ["x", "", "euler", "karras", 6, 4, 2**63 - 1, 2, 16, 16, None, 0.75, None, 1.0, None, 0, *NO_EXTRAS])
        assert events[-1][0] == "error" and "seed + batch - 1 exceeds" in json.dumps(events[-1][1])
        assert len(client.get("/api/jobs").json()["items"]) == 1
    time.sleep(0.2)  # a background thread (analytics, version check) would have asked by now
    assert no_network == []  # Gradio made no network call: no analytics, no version check


def slowed(set_progress, seconds=0.05):
    def wrapper(*args, **kwargs):
        time.sleep(seconds)
        set_progress(*args, **kwargs)

    return wrapper


def test_a_super_resolution_model_gets_an_upscale_tab_that_enlarges_an_upload(tmp_path):
    sr = load_model(make_tiny_model(tmp_path / "sr", sample_size=16, sr_from=8))
    app = create_app(sr, tmp_path / "data")
    with TestClient(app) as client:
        tabs = {c["props"].get("elem_id"): c["props"].get("visible") for c in client.get("/config").json()["components"]
                if c.get("type") == "tabitem"}
        assert tabs == {"tab-upscale": True, "tab-txt2img": False, "tab-img2img": False, "tab-inpaint": False, "tab-edit": False,
                    "tab-collage": False, "tab-instruct": False}
        buf = io.BytesIO()
        rgba((8, 8)).save(buf, format="PNG")
        (path,) = client.post("/gradio_api/upload", files={"files": ("low.png", buf.getvalue(), "image/png")}).json()
        upload = {"path": path, "meta": {"_type": "gradio.FileData"}}
        events = call(client, ["red apple", "", "euler", "karras", 3, 4, 5, 1, 64, 64, None, 0.75, None, 1.0, upload, 20, *NO_EXTRAS])
        assert events[-1][0] == "complete", events[-1]
        (item,) = events[-1][1][2]
        assert Image.open(item["image"]["path"]).size == (16, 16)  # 2x the upload; the Width/Height sliders ignored
        (job,) = client.get("/api/jobs").json()["items"]
        assert job["request"]["noise_level"] == 20 and job["request"]["width"] is None


def test_the_collage_layout_and_the_editors_uploads_become_the_request():
    star = png_b64(rgba((8, 8)))
    state = EditorState(16, 16, {"star.png": star}).dumps()
    spec = {"layers": [{"prompt": "red apple", "box": [0, 4, 8, 12], "strength": 0.3},
                       {"prompt": "a star", "box": [8, 4, 16, 12], "image": "star.png", "seed": 7}], "harmonize": 0.5}
    text = layout_text(spec)
    assert json.loads(text) == spec and text.splitlines()[1:3] == [  # one layer a line, as the editor writes it
        '  {"prompt": "red apple", "box": [0, 4, 8, 12], "strength": 0.3},',
        '  {"prompt": "a star", "box": [8, 4, 16, 12], "image": "star.png", "seed": 7}']
    req = build_request(**{**FORM, "mode": "collage", "batch": 1}, collage_layout=text, collage_state=state)
    (apple, star_layer), collage = req.collage.layers, req.collage
    assert (apple.prompt, apple.box, apple.strength, apple.image) == ("red apple", (0, 4, 8, 12), 0.3, None)
    assert (star_layer.image, star_layer.seed, star_layer.strength, collage.harmonize) == (star, 7, 0.25, 0.5)
    assert json.loads(layout_text(default_layout(16)))["layers"][1]["box"] == [8, 4, 16, 12]
    assert EditorState.loads(state) == EditorState(16, 16, {"star.png": star})


@pytest.mark.parametrize(
    "text,needle",
    [
        ('{"layers": [', r"^collage layout: Expecting value \(line 1, column 13\)$"),
        ("[]", r'^collage layout: write \{"layers": '),
        ('{"layers": []}', r"^collage\.layers: List should have at least 1 item"),
        ('{"layers": [{"prompt": "x", "box": [8, 0, 4, 4]}]}', r"^collage\.layers\.0\.box: a box is x0, y0, x1, y1 with x0 < x1"),
        ('{"layers": [{"prompt": "x", "box": [0, 0, 4, 4]}, {"prompt": "y", "box": [0, 0, 4]}]}', r"^collage\.layers\.1\.box"),
        ('{"layers": [{"prompt": "x", "box": [0, 0, 4, 4], "strenght": 1}]}', r"^collage\.layers\.0\.strenght: Extra inputs"),
        ('{"layers": [{"prompt": "x", "box": [0, 0, 4, 4], "image": "moon.png"}]}',
         r"^collage\.layers\.0\.image: 'moon\.png' is not an image uploaded in the editor$"),
    ],
)
def test_a_bad_collage_layout_gets_one_line_naming_the_layer(text, needle):
    with pytest.raises(InvalidRequestError, match=needle) as e:
        build_request(**{**FORM, "mode": "collage"}, collage_layout=text, collage_state=EditorState(16, 16).dumps())
    assert "\n" not in str(e.value)


def test_the_instruct_tab_sends_the_picture_and_both_guidance_scales(tmp_path):
    path = tmp_path / "src.png"
    rgba().save(path)
    req = build_request(**{**FORM, "mode": "instruct", "prompt": "make it green"}, instruct_path=str(path), image_cfg=1.25)
    assert base64.b64decode(req.source_image) == path.read_bytes()
    assert req.image_cfg_scale == 1.25 and req.cfg_scale == 5 and req.prompt == "make it green"
    with pytest.raises(InvalidRequestError, match="upload the image to edit"):
        build_request(**{**FORM, "mode": "instruct"})
    with pytest.raises(InvalidRequestError, match="write the instruction"):
        build_request(**{**FORM, "mode": "instruct", "prompt": " "}, instruct_path=str(path))
