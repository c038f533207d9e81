"""The AUTOMATIC1111-compatible API in-process: A1111's sampler names, the image it makes equals
`generate`'s for the translated request, A1111's error shape (one line) for an unknown sampler and for a
field dreamlab cannot honour, img2img and inpainting with A1111's mask options, progress and interrupt of
the running job, png-info and the options. The real client (webuiapi against `dreamlab serve`) is in
test_a1111_webuiapi.py."""

import base64
import hashlib
import io
import json
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dreamlab.errors import InvalidRequestError, UnknownNameError
from dreamlab.generate import generate, make_request
from dreamlab.metadata import parse_parameters
from dreamlab.server.a1111_schema import binary_mask, choose_sampler, fill_masked
from dreamlab.server.app import create_app
from dreamlab.server.service import Limits
from test_server import png_array, slow_steps, source_image, wait

SMALL = {"prompt": "red apple", "steps": 3, "width": 16, "height": 16}


@pytest.fixture
def client(tiny, tmp_path):
    with TestClient(create_app(tiny, tmp_path / "data", ui=False)) as c:
        yield c


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def square_mask(size=16, box=(4, 4, 12, 12)) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask


def assert_a1111_error(r, status, needle):
    body = r.json()
    assert r.status_code == status, body
    assert set(body) == {"error", "detail", "body", "errors"}, body
    assert needle in body["detail"] and "\n" not in body["detail"] and "Traceback" not in r.text, body


@pytest.mark.parametrize("name, scheduler, expected", [
    ("DPM++ 2M", "Karras", ("dpmpp_2m", "karras")),
    ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),  # the older combined name
    ("DPM++ 2M SDE Karras", "automatic", ("dpmpp_2m_sde", "karras")),  # the name's scheduler wins, as in A1111
    ("k_dpmpp_2m_ka", None, ("dpmpp_2m", "karras")),
    ("Euler a", None, ("euler_ancestral", None)),  # Automatic: the model's default schedule
    ("euler", "SGM Uniform", ("euler", "trailing")),
    ("Heun", "uniform", ("heun", "linspace")),
    ("DDIM", "DDIM", ("ddim", "leading")),
    (None, "karras", (None, "karras")),  # no sampler: the model's default
])
def test_a1111_sampler_and_scheduler_names(name, scheduler, expected):
    choice = choose_sampler(name, scheduler)
    assert (choice.sampler.sampler if choice.sampler else None, choice.scheduler.schedule) == expected


def test_samplers_and_schedulers_dreamlab_lacks_are_named():
    with pytest.raises(UnknownNameError, match="'LMS' is not a sampler dreamlab has; known: DPM\\+\\+ 2M"):
        choose_sampler("LMS", None)
    with pytest.raises(InvalidRequestError, match="'Exponential' is not in dreamlab; supported: Automatic"):
        choose_sampler("DPM++ 2M SDE Exponential", None)
    with pytest.raises(InvalidRequestError, match="'sideways' is not a scheduler"):
        choose_sampler("Euler", "sideways")


def test_txt2img_is_generate_of_the_translated_request(client, tiny):
    body = {**SMALL, "negative_prompt": "blurry", "seed": 21, "cfg_scale": 3, "sampler_name": "DPM++ 2M Karras",
            "batch_size": 2, "n_iter": 2}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.json()
    out = r.json()
    info = json.loads(out["info"])
    assert info["all_seeds"] == [21, 22, 23, 24] and info["sampler_name"] == "DPM++ 2M"
    assert info["extra_generation_params"] == {"Schedule type": "Karras"}
    assert out["parameters"]["sampler_name"] == "DPM++ 2M Karras" and out["parameters"]["n_iter"] == 2
    expected = generate(tiny, make_request(prompt="red apple", negative_prompt="blurry", seed=21, steps=3, cfg_scale=3,
                                           width=16, height=16, batch=4, sampler="dpmpp_2m", schedule="karras"))
    for image, ref, text in zip(out["images"], expected.images, info["infotexts"], strict=True):
        png = base64.b64decode(image)
        assert np.array_equal(png_array(png), np.asarray(ref))
        chunks = Image.open(io.BytesIO(png)).text  # the gallery's PNG: parameters text and manifest
        assert chunks["parameters"] == text and json.loads(chunks["dreamlab"])["request"]["sampler"] == "dpmpp_2m"
    # the same queue as /api/jobs: the job and its images are there
    job = client.get(f"/api/jobs/{info['job_id']}").json()
    assert job["state"] == "done" and len(job["images"]) == 4
    assert client.post("/sdapi/v1/txt2img", json={**body, "send_images": False}).json()["images"] == []


def test_fields_at_a1111_defaults_are_accepted(client):
    """What webuiapi sends when asked for nothing special: every field, at A1111's defaults."""
    defaults = {"enable_hr": False, "denoising_strength": 0.7, "hr_scale": 2, "hr_upscaler": "Latent", "hr_prompt": "",
                "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0,
                "seed_resize_from_w": 0, "sampler_name": "Euler a", "scheduler": "automatic", "sampler_index": "Euler a",
                "batch_size": 1, "n_iter": 1, "cfg_scale": 7.0, "restore_faces": False, "tiling": False,
                "do_not_save_samples": False, "do_not_save_grid": False, "eta": 1.0, "s_churn": 0, "s_tmax": 0,
                "s_tmin": 0, "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
                "script_args": [], "script_name": None, "send_images": True, "save_images": False, "alwayson_scripts": {}}
    r = client.post("/sdapi/v1/txt2img", json={**defaults, **SMALL})
    assert r.status_code == 200, r.json()
    info = json.loads(r.json()["info"])
    assert 0 <= info["seed"] < 2**31 and info["cfg_scale"] == 7.0 and info["sampler_name"] == "Euler a"


def test_unknown_sampler_gets_a1111s_error_shape(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "sampler_name": "DPM++ 9M Turbo"})
    assert_a1111_error(r, 404, "sampler_name: 'DPM++ 9M Turbo' is not a sampler dreamlab has")
    assert r.json()["error"] == "HTTPException" and r.json()["errors"].startswith("404: ")
    assert client.get("/api/jobs").json()["items"] == []  # nothing was queued


@pytest.mark.parametrize("extra, needle", [
    ({"enable_hr": True}, "enable_hr=True: hires fix is not in dreamlab"),
    ({"restore_faces": True}, "restore_faces=True: face restoration is not in dreamlab"),
    ({"subseed_strength": 0.5}, "subseed_strength=0.5: variation seeds are not in dreamlab"),
    ({"override_settings": {"sd_model_checkpoint": "v1-5-pruned.safetensors"}},
     "override_settings.sd_model_checkpoint='v1-5-pruned.safetensors': it is 'tiny-random ["),
    ({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}, "alwayson_scripts="),
    ({"scheduler": "Beta"}, "scheduler: 'Beta' is not in dreamlab"),
    ({"hires": True}, "hires: Extra inputs are not permitted"),  # not an A1111 field at all
    ({"steps": 0}, "steps: Input should be greater than or equal to 1"),
    ({"batch_size": 4, "n_iter": 3}, "batch_size x n_iter: at most 8 on this server"),  # the server's limit
])
def test_fields_dreamlab_cannot_honour_get_a1111s_error_shape(client, extra, needle):
    assert_a1111_error(client.post("/sdapi/v1/txt2img", json={**SMALL, **extra}), 422, needle)


def test_every_refused_field_is_named_in_one_line(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "enable_hr": True, "tiling": True, "styles": ["noir"]})
    assert_a1111_error(r, 422, "enable_hr=True")
    assert "tiling=True" in r.json()["detail"] and "styles=['noir']" in r.json()["detail"]


def test_img2img_and_inpainting_with_a1111s_mask_options(client, tiny):
    src = source_image()
    body = {**SMALL, "init_images": ["data:image/png;base64," + b64(src)], "seed": 5, "denoising_strength": 0.6,
            "sampler_name": "Euler"}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.json()
    assert r.json()["parameters"]["init_images"] is None  # include_init_images is off
    expected = generate(tiny, make_request(prompt="red apple", steps=3, width=16, height=16, seed=5, strength=0.6,
                                           sampler="euler", init_image=b64(src))).images[0]
    assert np.array_equal(png_array(base64.b64decode(r.json()["images"][0])), np.asarray(expected))

    # inpainting, "original" content under a hard mask: the unmasked pixels are the source's, exactly
    mask = square_mask()
    r = client.post("/sdapi/v1/img2img", json={**body, "mask": b64(mask), "inpainting_fill": 1, "mask_blur": 0,
                                               "inpaint_full_res": False, "denoising_strength": 1.0})
    assert r.status_code == 200, r.json()
    out = png_array(base64.b64decode(r.json()["images"][0]))
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], np.asarray(src)[keep]) and not np.array_equal(out[~keep], np.asarray(src)[~keep])

    # inverted, blurred, filled: the job records the mask and source it ran with
    r = client.post("/sdapi/v1/img2img", json={**body, "mask": b64(mask), "inpainting_mask_invert": 1, "mask_blur": 2,
                                               "inpaint_full_res": False})
    assert r.status_code == 200, r.json()
    job = client.get(f"/api/jobs/{json.loads(r.json()['info'])['job_id']}").json()
    ran_mask = np.asarray(Image.open(io.BytesIO(client.get(f"/api/inputs/{job['request']['mask_image'][7:]}").content)))
    assert ran_mask[8, 8] < 64 and ran_mask[0, 0] == 255 and 0 < ran_mask[8, 4] < 255  # inverted, blurred at the edge
    assert job["request"]["init_image"] != "sha256:" + hashlib.sha256(base64.b64decode(b64(src))).hexdigest()  # filled


@pytest.mark.parametrize("extra, needle", [
    ({"inpaint_full_res": True}, "inpaint_full_res=True: dreamlab inpaints the whole picture"),
    ({"inpainting_fill": 2}, "inpainting_fill=2: only 0 (fill) and 1 (original)"),
    ({"init_images": []}, "init_images: img2img needs an image"),
    ({"mask": "not base64!"}, "mask is not valid base64"),
])
def test_img2img_refusals_are_one_line(client, extra, needle):
    body = {**SMALL, "init_images": [b64(source_image())], "mask": b64(square_mask()), "inpaint_full_res": False, **extra}
    assert_a1111_error(client.post("/sdapi/v1/img2img", json=body), 422, needle)


def test_fill_replaces_the_masked_pixels_from_around_them_and_keeps_the_rest():
    arr = np.zeros((16, 16, 4), np.uint8)
    arr[...] = (200, 40, 10, 255)
    arr[4:12, 4:12] = (0, 255, 0, 255)  # what the mask hides must not leak into the fill
    out = np.asarray(fill_masked(Image.fromarray(arr, "RGBA"), square_mask()))
    assert (out == (200, 40, 10, 255)).all()  # uniform surroundings: the hole gets their colour exactly
    rgba = source_image()
    out = np.asarray(fill_masked(rgba, square_mask()))
    keep = np.asarray(square_mask()) == 0
    assert np.array_equal(out[keep], np.asarray(rgba)[keep])


def test_a1111_reads_a_masks_alpha_when_it_has_transparency():
    mask = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    mask.putpixel((1, 1), (0, 0, 0, 255))  # black but opaque: painted
    assert np.asarray(binary_mask(mask)).tolist()[1] == [0, 255, 0, 0]
    assert np.asarray(binary_mask(Image.new("RGB", (2, 2), (200, 200, 200)))).tolist() == [[255, 255], [255, 255]]


def test_progress_and_interrupt_act_on_the_running_job(tiny, tmp_path):
    app = create_app(tiny, tmp_path / "data", ui=False, preview_every=1)
    slow_steps(app, 0.05)
    with TestClient(app) as client:
        assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
        job_id = client.post("/api/jobs", json={**SMALL, "steps": 150}).json()["id"]  # any face's job
        deadline = time.monotonic() + 30
        while (p := client.get("/sdapi/v1/progress").json())["state"]["sampling_step"] < 2 or not p["current_image"]:
            assert time.monotonic() < deadline, p
            time.sleep(0.02)
        assert p["state"]["job"] == job_id and p["state"]["sampling_steps"] == 150 and 0 < p["progress"] < 1
        assert p["eta_relative"] > 0 and Image.open(io.BytesIO(base64.b64decode(p["current_image"]))).format == "PNG"
        assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
        assert client.post("/sdapi/v1/interrupt").json() == {}
        assert wait(client, job_id)["state"] == "cancelled"

        answer = {}
        thread = threading.Thread(target=lambda: answer.update(r=client.post("/sdapi/v1/txt2img", json={**SMALL, "steps": 150})))
        thread.start()
        while client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
            assert time.monotonic() < deadline + 30
            time.sleep(0.02)
        client.post("/sdapi/v1/interrupt")
        thread.join(30)
        r = answer["r"]  # as A1111: an interrupted request answers 200, here without images
        assert r.status_code == 200 and r.json()["images"] == [] and json.loads(r.json()["info"])["state"] == "cancelled"


def test_png_info_reads_the_parameters_text(client, tiny):
    out = client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 9, "negative_prompt": "dull"}).json()
    r = client.post("/sdapi/v1/png-info", json={"image": out["images"][0]})
    info = r.json()
    assert info["info"] == json.loads(out["info"])["infotexts"][0]
    assert info["parameters"]["Prompt"] == "red apple" and info["parameters"]["Negative prompt"] == "dull"
    assert info["parameters"]["Seed"] == "9" and info["parameters"]["Size-1"] == "16"
    assert json.loads(info["items"]["dreamlab"])["seed"] == 9  # the manifest travels among the other chunks
    assert client.post("/sdapi/v1/png-info", json={"image": ""}).json() == {"info": "", "items": {}, "parameters": {}}
    assert_a1111_error(client.post("/sdapi/v1/png-info", json={"image": b64(source_image())[:40]}), 422, "image")


def test_parameters_text_parses_back():
    text = "a cat, sitting\nNegative prompt: dog\nmore dog\nSteps: 20, Sampler: DPM++ 2M, Lora hashes: \"a: 1, b: 2\", Size: 512x768"
    fields = parse_parameters(text)
    assert fields["Prompt"] == "a cat, sitting" and fields["Negative prompt"] == "dog\nmore dog"
    assert fields["Lora hashes"] == "a: 1, b: 2" and (fields["Size-1"], fields["Size-2"]) == ("512", "768")
    assert parse_parameters("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}


def test_models_samplers_schedulers_and_options(client):
    models = client.get("/sdapi/v1/sd-models").json()
    assert len(models) == 1 and models[0]["model_name"] == "tiny-random" and len(models[0]["sha256"]) == 64
    assert models[0]["title"] == f"tiny-random [{models[0]['hash']}]"
    names = {s["name"]: s["aliases"] for s in client.get("/sdapi/v1/samplers").json()}
    assert list(names) == ["DPM++ 2M", "DPM++ 2M SDE", "Euler a", "Euler", "Heun", "DDIM"]
    assert "k_euler_a" in names["Euler a"] and "euler_ancestral" in names["Euler a"]
    assert [s["label"] for s in client.get("/sdapi/v1/schedulers").json()] == ["Automatic", "Uniform", "Karras",
                                                                                "SGM Uniform", "DDIM"]
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == models[0]["title"] and options["sd_checkpoint_hash"] == models[0]["sha256"]
    for same in ({"sd_model_checkpoint": "tiny-random"}, {"sd_model_checkpoint": models[0]["hash"]}, options, {}):
        r = client.post("/sdapi/v1/options", json=same)
        assert r.status_code == 200 and r.json() is None, r.json()
    assert_a1111_error(client.post("/sdapi/v1/options", json={"samples_format": "jpg"}), 422,
                       "samples_format='jpg': it is 'png' on this server and cannot be changed")
    assert_a1111_error(client.post("/sdapi/v1/options", json={"sd_vae": "kl-f8.safetensors", "x": 1}), 422, "x=1: not a setting")
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}


def test_a1111_requests_obey_the_servers_limits_and_queue(tiny, tmp_path):
    app = create_app(tiny, tmp_path / "data", ui=False, run_worker=False, limits=Limits(max_queue=0))
    with TestClient(app) as client:
        assert_a1111_error(client.post("/sdapi/v1/txt2img", json=SMALL), 429, "the queue is full")
        assert_a1111_error(client.post("/sdapi/v1/txt2img", json={**SMALL, "width": 4096}), 422, "width")
