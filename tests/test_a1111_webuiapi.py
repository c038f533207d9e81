"""A client nobody here wrote: webuiapi (PyPI, written against the AUTOMATIC1111 web UI) drives a real
`dreamlab serve` on a free loopback port with the tiny model, unchanged: the sampler list, txt2img,
img2img with a mask, png-info, and the model and options it reads at start. Its images are generate's."""

import numpy as np
import pytest
import webuiapi
from PIL import Image

from dreamlab.generate import generate, make_request
from dreamlab.loading.model import load_model
from server_process import ServerProcess


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    process = ServerProcess(tiny_dir, tmp_path_factory.mktemp("a1111") / "data")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=4)


def test_webuiapi_lists_samplers_models_and_options(api):
    assert api.util_get_sampler_names() == sorted(["DPM++ 2M", "DPM++ 2M SDE", "Euler a", "Euler", "Heun", "DDIM"])
    assert "Karras" in [s["label"] for s in api.get_schedulers()]
    title = api.util_get_current_model()
    assert title.startswith("tiny-random [") and api.util_get_model_names() == [title]
    api.util_set_model("tiny-random")  # the model it already has: accepted (options unchanged)
    assert api.util_get_current_model() == title
    assert api.get_progress()["state"]["job_count"] == 0


def test_webuiapi_txt2img_and_png_info(api, tiny_dir):
    result = api.txt2img(prompt="red apple", negative_prompt="blurry", seed=7, cfg_scale=5, width=16, height=16,
                         batch_size=2)
    assert [im.size for im in result.images] == [(16, 16), (16, 16)]
    assert result.info["all_seeds"] == [7, 8] and result.info["sampler_name"] == "Euler a"
    assert result.parameters["prompt"] == "red apple"
    # webuiapi sends eta 1.0 and A1111's defaults for everything else: Euler a, eta 1, the model's schedule
    expected = generate(load_model(tiny_dir), make_request(prompt="red apple", negative_prompt="blurry", seed=7, cfg_scale=5,
                                                           width=16, height=16, batch=2, steps=4, sampler="euler_ancestral",
                                                           eta=1.0))
    for got, ref in zip(result.images, expected.images, strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(ref))
    assert result.images[0].info["parameters"] == result.info["infotexts"][0]
    assert '"seed": 7' in result.images[0].info["dreamlab"]  # the manifest, as in every dreamlab PNG

    info = api.png_info(result.images[1])
    assert info.info == result.info["infotexts"][1]
    assert info.parameters["Seed"] == "8" and info.parameters["Negative prompt"] == "blurry"


def test_webuiapi_img2img_with_a_mask(api):
    arr = np.random.default_rng(1).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    arr[..., 3] = 255
    source = Image.fromarray(arr, "RGBA")
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (4, 4, 12, 12))
    result = api.img2img(images=[source], mask_image=mask, prompt="a green apple", seed=3, width=16, height=16,
                         denoising_strength=1.0, inpainting_fill=1, mask_blur=0, inpaint_full_res=False)
    out = np.asarray(result.images[0])
    keep = np.asarray(mask) == 0
    assert out.shape == (16, 16, 4) and np.array_equal(out[keep], arr[keep])  # unmasked pixels: the source's
    assert not np.array_equal(out[~keep], arr[~keep]) and result.info["denoising_strength"] == 1.0

    plain = api.img2img(images=[source], prompt="a green apple", seed=3, width=16, height=16, denoising_strength=0.5)
    assert plain.images[0].size == (16, 16) and plain.info["all_seeds"] == [3]
    # webuiapi's defaults with a mask (blur 4, fill 0) are honoured too; only 'Only masked' must be turned off
    assert api.img2img(images=[source], mask_image=mask, width=16, height=16, inpaint_full_res=False).images


def test_webuiapi_sees_a1111s_error_shape(api):
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", sampler_name="DPM++ 9M", width=16, height=16)
    status, text = e.value.args
    assert status == 404 and '"error":"HTTPException"' in text.replace(" ", "") and "DPM++ 9M" in text
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", enable_hr=True, width=16, height=16)
    assert e.value.args[0] == 422 and "hires fix is not in dreamlab" in e.value.args[1]
