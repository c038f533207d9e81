"""The Gradio web UI end to end in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): type a
prompt, generate, watch the progress bar and previews, see the images in the results and the gallery,
search, show an image's parameters and delete it; inpaint by painting on the ImageEditor; image to image
from an uploaded file; place a collage's layers with the mouse. The page must ask nothing of any host but the server. Skipped only when Chromium
is absent outside CI (CI fails instead)."""

import hashlib
import io
import os
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from dreamlab.loading.model import load_model
from dreamlab.models.tiny import make_tiny_model
from dreamlab.server.app import create_app

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _need_browser():
    missing = None
    if not os.path.exists(CHROMIUM):
        missing = f"{CHROMIUM} is not installed (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "playwright is not installed (pip install -e '.[test]')"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run in CI: {missing}")
        pytest.skip(missing)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture
def live(tiny, tmp_path):
    """The app (API + Gradio UI) under uvicorn on 127.0.0.1 in a thread; each step slowed a little so
    progress shows."""
    import uvicorn

    _need_browser()
    app = create_app(tiny, tmp_path / "data", preview_every=1)
    store = app.state.server.store
    set_progress = store.set_progress

    def slowed(*args, **kwargs):
        time.sleep(0.08)
        set_progress(*args, **kwargs)

    store.set_progress = slowed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(20)


@pytest.fixture
def browser(tmp_path):
    """A fresh Chromium profile; every request to a host other than the server is recorded (and refused)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1300, "height": 1000},
        )
        context.set_default_timeout(30_000)
        elsewhere: list[str] = []

        def route(r):
            if r.request.url.startswith(("http://127.0.0.1:", "data:", "blob:")):
                r.continue_()
            else:
                elsewhere.append(r.request.url)
                r.abort()

        context.route("**/*", route)
        page = context.new_page()
        yield page, elsewhere
        context.close()


def open_ui(page, url):
    page.goto(url)
    page.wait_for_selector("#generate")
    page.wait_for_function("document.querySelector('#progress')?.textContent.includes('ready')")


def set_number(page, elem_id, value):
    """A Gradio slider or number: type into its number box and commit."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def watch_progress(page):
    """Record every status text and preview image the page shows, from now on."""
    page.evaluate(
        """() => {
            window.__status = []; window.__previews = [];
            const progress = document.querySelector('#progress'), preview = document.querySelector('#preview');
            new MutationObserver(() => window.__status.push(progress.textContent.trim()))
                .observe(progress, {childList: true, subtree: true, characterData: true});
            new MutationObserver(() => { const img = preview.querySelector('img'); if (img) window.__previews.push(img.src); })
                .observe(preview, {childList: true, subtree: true, attributes: true});
        }"""
    )


def generate(page):
    """Click Generate and wait for this generation's end; its last status line."""
    watch_progress(page)
    page.click("#generate")
    page.wait_for_function("window.__status.some(s => /^(done|failed|cancelled)/.test(s))", timeout=60_000)
    return page.text_content("#progress").strip()


def gallery_captions(page):
    return page.locator("#gallery .grid-container .thumbnail-item img").evaluate_all("imgs => imgs.map(i => i.alt)")


def test_generate_in_the_browser_and_find_it_in_the_gallery(live, browser, tmp_path):
    import httpx

    url, _ = live
    page, elsewhere = browser
    open_ui(page, url)
    assert "tiny-random" in page.text_content("#model-name")
    assert page.locator("#control-image input[type=file]").count() == 0  # the tiny model has no ControlNet: not usable
    assert "No ControlNet for this model is installed" in page.text_content("#control-note")

    page.locator("#prompt textarea").fill("red apple from the browser")
    page.locator("#negative textarea").fill("blurry")
    page.locator("#sampler input").click()
    page.get_by_role("option", name="euler_ancestral", exact=True).click()
    set_number(page, "steps", 8)
    set_number(page, "cfg", 4)
    page.locator("#seed input").fill("42")
    set_number(page, "batch", 2)
    status = generate(page)
    assert status == "done: 2 images, seed 42, 43", status
    seen = page.evaluate("window.__status")
    assert any(s.startswith("step ") and s.endswith(" / 16") for s in seen), seen  # 8 steps x 2 images
    assert page.evaluate("window.__previews"), "no preview was shown"
    page.wait_for_function("document.querySelectorAll('#results .grid-container .thumbnail-item img').length === 2")
    page.wait_for_function("document.querySelectorAll('#gallery .grid-container .thumbnail-item img').length === 2")
    assert sorted(gallery_captions(page)) == ["red apple from the browser · 42", "red apple from the browser · 43"]
    page.wait_for_function("[...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth === 16)")
    page.screenshot(path=str(tmp_path / "ui.png"))

    # the UI queued a job like POST /api/jobs does: it is in the API's job list, with the form's values
    items = httpx.get(f"{url}/api/gallery", params={"q": "from the browser"}).json()["items"]
    assert sorted(im["seed"] for im in items) == [42, 43]
    req = httpx.get(f"{url}{items[0]['metadata_url']}").json()["manifest"]["request"]
    assert (req["sampler"], req["steps"], req["cfg_scale"], req["negative_prompt"]) == ("euler_ancestral", 8, 4, "blurry")
    assert httpx.get(f"{url}/api/jobs").json()["items"][0]["state"] == "done"

    page.locator("#search input, #search textarea").first.fill("nothing like this")
    page.locator("#search input, #search textarea").first.press("Enter")
    page.wait_for_function("document.querySelectorAll('#gallery .grid-container .thumbnail-item').length === 0")
    page.locator("#search input, #search textarea").first.fill("")
    page.click("#refresh")
    page.wait_for_function("document.querySelectorAll('#gallery .grid-container .thumbnail-item').length === 2")

    page.locator("#gallery .grid-container .thumbnail-item").first.click()
    page.wait_for_function("document.querySelector('#params textarea').value.includes('Seed: ')")
    params = page.input_value("#params textarea")
    assert params.startswith("red apple from the browser\nNegative prompt: blurry\nSteps: 8, Sampler: euler_ancestral")
    page.click("#delete")
    page.wait_for_function("document.querySelectorAll('#gallery .grid-container .thumbnail-item').length === 1")
    assert httpx.get(f"{url}/api/gallery").json()["total"] == 1

    set_number(page, "steps", 100)  # cancel a running job
    watch_progress(page)
    page.click("#generate")
    page.wait_for_function("window.__status.some(s => /^step \\d+ \\/ 200$/.test(s))")  # 100 steps x 2 images
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#progress').textContent.trim() === 'cancelled'")
    assert httpx.get(f"{url}/api/jobs").json()["items"][0]["state"] == "cancelled"
    assert elsewhere == []


def test_img2img_from_a_file_and_inpaint_with_the_mask_brush(live, browser, tmp_path):
    import httpx

    url, _ = live
    page, elsewhere = browser
    arr = np.random.default_rng(3).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    arr[..., 3] = 255
    src = tmp_path / "source.png"
    Image.fromarray(arr, "RGBA").save(src)

    open_ui(page, url)
    page.locator("#prompt textarea").fill("inpainted")
    set_number(page, "steps", 4)
    page.locator("#seed input").fill("7")
    # image to image first (the editor's canvas costs CPU once shown): the uploaded file's bytes are sent as
    # they are, so the job records sha256sum of the file
    page.get_by_role("tab", name="Image to image").click()
    page.locator("#init-image input[type=file]").set_input_files(str(src))
    page.wait_for_selector("#init-image img")
    set_number(page, "img2img-strength", 0.5)
    assert generate(page) == "done: 1 image, seed 7"
    (job,) = httpx.get(f"{url}/api/jobs").json()["items"]
    assert job["state"] == "done" and job["request"]["mask_image"] is None
    assert job["request"]["init_image"] == "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    assert job["request"]["strength"] == 0.5

    page.get_by_role("tab", name="Inpainting").click()
    page.click("#generate")  # no source yet: a message, no job
    page.wait_for_selector(".toast-body:has-text('upload a source image first')")
    page.locator("#mask-editor input[type=file]").set_input_files(str(src))
    # the editor enlarges the 16x16 source to fit, centred on its canvas: wait for that, read the scale
    page.wait_for_function("parseInt(document.querySelector('#mask-editor .zoom-number')?.textContent || '0') >= 400")
    scale = int(page.text_content("#mask-editor .zoom-number").strip().rstrip("%")) / 100  # css px per source pixel
    page.click("#generate")  # nothing painted yet
    page.wait_for_selector(".toast-body:has-text('paint the region to repaint')")
    assert len(httpx.get(f"{url}/api/jobs").json()["items"]) == 1

    # one stroke along source row 8, from x = 7.5 to 11.5 (the brush's radius is one source pixel)
    page.locator("#mask-editor button[aria-label=Brush]").click()
    box = page.locator("#mask-editor canvas").first.bounding_box()
    x0, y0 = box["x"] + box["width"] / 2 - 8 * scale, box["y"] + box["height"] / 2 - 8 * scale  # source (0, 0)
    page.mouse.move(x0 + 7.5 * scale, y0 + 8.5 * scale)
    page.mouse.down()
    page.mouse.move(x0 + 11.5 * scale, y0 + 8.5 * scale, steps=4)
    page.mouse.up()
    page.screenshot(path=str(tmp_path / "inpaint.png"))
    assert generate(page) == "done: 1 image, seed 7"

    job = httpx.get(f"{url}/api/jobs").json()["items"][0]
    assert job["request"]["strength"] == 1.0
    inputs = {key: httpx.get(f"{url}/api/inputs/{job['request'][key].removeprefix('sha256:')}").content
              for key in ("init_image", "mask_image")}
    for key, data in inputs.items():  # stored under the sha256 of their bytes
        assert job["request"][key] == "sha256:" + hashlib.sha256(data).hexdigest()
    source = np.asarray(Image.open(io.BytesIO(inputs["init_image"])).convert("RGBA"))
    assert np.array_equal(source, arr)  # the editor's background is the uploaded image
    mask = np.asarray(Image.open(io.BytesIO(inputs["mask_image"])))
    assert mask.shape == (16, 16) and set(np.unique(mask)) == {0, 255}  # hard-edged
    assert mask[8, 8] == mask[8, 11] == 255 and mask[0, 0] == mask[15, 15] == mask[8, 2] == mask[2, 8] == 0
    out = np.asarray(Image.open(io.BytesIO(httpx.get(url + job["images"][0]["url"]).content)))
    keep = mask == 0
    assert np.array_equal(out[keep], arr[keep])  # unpainted pixels are the source's, exactly
    assert not np.array_equal(out[~keep], arr[~keep])

    assert elsewhere == []


def test_api_docs_render_offline(live, browser):
    """Swagger UI and ReDoc from this server's own copies of their scripts (the fastapi-offline wheel): both
    render the schema, A1111 routes included, and ask no other host for anything (the pages' policy stops
    the Redocly logo ReDoc's menu shows before it is requested; that is the only thing it stops)."""
    url, _ = live
    page, elsewhere = browser
    page.add_init_script("window.__blocked = []; document.addEventListener('securitypolicyviolation', "
                         "e => window.__blocked.push(e.blockedURI))")
    page.goto(f"{url}/docs")
    page.wait_for_selector(".opblock-summary-path")
    paths = page.locator(".opblock-summary-path").all_text_contents()
    assert {"/api/jobs", "/api/gallery", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/png-info"} <= set(paths)
    assert "dreamlab" in page.text_content(".info .title")
    assert page.evaluate("window.__blocked") == []

    page.goto(f"{url}/redoc")
    page.wait_for_selector("h1")
    assert page.text_content("h1").startswith("dreamlab")
    page.wait_for_function("[...document.querySelectorAll('h2')].some(h => h.textContent.includes('Txt2Img'))")
    assert "/sdapi/v1/img2img" in page.text_content("body")
    assert set(page.evaluate("window.__blocked")) <= {"https://cdn.redoc.ly/redoc/logo-mini.svg"}
    assert elsewhere == []


def test_edit_by_prompt_and_a_collage_in_the_browser(live, browser):
    import httpx

    url, _ = live
    page, elsewhere = browser
    open_ui(page, url)
    page.locator("#prompt textarea").fill("red apple")
    set_number(page, "steps", 4)
    page.locator("#seed input").fill("5")
    page.get_by_role("tab", name="Edit by prompt").click()
    page.locator("#edit-target textarea").fill("green apple")
    page.locator("#edit-reweight textarea, #edit-reweight input").first.fill("green=2")
    assert generate(page) == "done: 3 images, seed 5, 5, 5"  # the edit, its source, its attention sheet
    (job,) = httpx.get(f"{url}/api/jobs").json()["items"]
    assert job["request"]["edit"]["target"] == "green apple" and job["request"]["edit"]["reweight"] == {"green": 2.0}
    page.wait_for_function("document.querySelectorAll('#results .grid-container .thumbnail-item img').length === 3")

    page.get_by_role("tab", name="Collage").click()
    page.wait_for_selector("#collage-editor .dl-layer")  # the default layout, drawn
    assert generate(page) == "done: 4 images, seed 5, 5, 5, 5"  # the scene, the collage, its two layers
    job = httpx.get(f"{url}/api/jobs").json()["items"][0]
    assert [layer["prompt"] for layer in job["request"]["collage"]["layers"]] == ["red apple", "pizza"]
    assert elsewhere == []


def layer_boxes(page, scale):
    """The collage editor's layers as drawn, in layout pixels: (x0, y0, x1, y1) from their boxes on screen."""
    canvas = page.locator("#collage-editor .dl-canvas").bounding_box()
    out = []
    for box in page.locator("#collage-editor .dl-layer").evaluate_all("ds => ds.map(d => d.getBoundingClientRect().toJSON())"):
        x0, y0 = (box["x"] - canvas["x"]) / scale, (box["y"] - canvas["y"]) / scale
        out.append(tuple(round(v) for v in (x0, y0, x0 + box["width"] / scale, y0 + box["height"] / scale)))
    return out


def drag(page, x, y, dx, dy):
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx, y + dy, steps=6)
    page.mouse.up()


def test_the_collage_editor_places_layers_with_the_mouse(live, browser, tmp_path):
    """Delete the default layers, add two, move one and resize both by dragging, type their prompts,
    reorder them, give one an uploaded RGBA image, edit a box as text; the job gets the boxes dragged (to
    a pixel) and the images come back."""
    import json

    import httpx

    url, _ = live
    page, elsewhere = browser
    star = np.zeros((8, 8, 4), dtype=np.uint8)
    star[2:6, 2:6] = (255, 200, 0, 255)  # opaque in the middle, transparent around it
    star_path = tmp_path / "star.png"
    Image.fromarray(star, "RGBA").save(star_path)

    open_ui(page, url)
    page.locator("#prompt textarea").fill("a picnic")
    set_number(page, "steps", 3)
    page.locator("#seed input").fill("5")
    set_number(page, "width", 64)
    set_number(page, "height", 48)
    page.get_by_role("tab", name="Collage").click()
    status = "#collage-editor .dl-status"
    page.wait_for_function(f"document.querySelector('{status}')?.textContent.startsWith('64 × 48 px, shown at 6×')")
    text = lambda: page.input_value("#collage-layout textarea")  # noqa: E731
    layers = lambda: json.loads(text())["layers"]  # noqa: E731

    canvas = page.locator("#collage-editor .dl-canvas").bounding_box()
    s = canvas["width"] / 64
    assert (s, canvas["height"] / 48) == (6, 6)  # a small canvas is shown enlarged, at a scale it says

    def at(x, y):  # a layout pixel on screen
        return canvas["x"] + x * s, canvas["y"] + y * s

    page.locator("#collage-editor .dl-layer").first.click()
    page.click("#collage-editor [data-act=delete]")
    page.click("#collage-editor [data-act=delete]")
    assert text() == '{"layers": []}' and page.locator("#collage-editor .dl-layer").count() == 0

    page.click("#collage-editor [data-act=add]")  # half the canvas, at its corner; its prompt field focused
    page.keyboard.type("red apple")
    page.click("#collage-editor [data-act=add]")  # the next one cascaded by an eighth of the canvas
    page.locator("#collage-editor .dl-panel [name=prompt]").fill("pizza")
    assert layers() == [{"prompt": "red apple", "box": [0, 0, 32, 24], "strength": 0.25},
                        {"prompt": "pizza", "box": [8, 6, 40, 30], "strength": 0.25}]

    drag(page, *at(24, 18), 20 * s, 14 * s)  # pizza (on top) moved by (20, 14)
    assert layers()[1]["box"] == [28, 20, 60, 44]
    drag(page, *at(60, 44), -6 * s, 2 * s)  # its bottom-right corner
    assert layers()[1]["box"] == [28, 20, 54, 46]
    page.mouse.click(*at(10, 10))  # the apple, where the pizza does not cover it
    drag(page, *at(0, 0), 4 * s, 2 * s)  # its top-left corner
    assert layers()[0]["box"] == [4, 2, 32, 24]
    page.locator("#collage-editor .dl-panel [name=strength]").fill("0.4")

    page.click("#collage-editor [data-act=up]")  # the apple above the pizza
    page.locator("#collage-editor input.dl-file").set_input_files(str(star_path))
    page.wait_for_selector("#collage-editor .dl-layer img")
    # the image fills its box, so the box takes its proportions, inside the box it had (28 x 22 -> 22 x 22)
    assert layers() == [{"prompt": "pizza", "box": [28, 20, 54, 46], "strength": 0.25},
                        {"prompt": "red apple", "box": [4, 2, 26, 24], "strength": 0.4, "image": "star.png"}]

    # typing in the layout redraws the canvas: the pizza's box as text
    page.locator("#collage-layout textarea").fill(text().replace("[28, 20, 54, 46]", "[30, 20, 56, 46]"))
    page.wait_for_function("document.querySelector('#collage-editor .dl-layer')?.style.left === '180px'")
    assert layer_boxes(page, s) == [(30, 20, 56, 46), (4, 2, 26, 24)]
    page.locator("#collage-editor").screenshot(path=str(tmp_path / "collage-editor.png"))

    assert generate(page) == "done: 4 images, seed 5, 5, 5, 5"  # the scene, the collage, its two layers
    page.wait_for_function("document.querySelectorAll('#results .grid-container .thumbnail-item img').length === 4")
    job = httpx.get(f"{url}/api/jobs").json()["items"][0]
    sent = job["request"]["collage"]["layers"]
    assert [(layer["prompt"], layer["box"], layer["strength"]) for layer in sent] == [
        ("pizza", [30, 20, 56, 46], 0.25), ("red apple", [4, 2, 26, 24], 0.4)]
    assert sent[1]["image"] == "sha256:" + hashlib.sha256(star_path.read_bytes()).hexdigest()  # the file as uploaded
    assert (job["request"]["width"], job["request"]["height"]) == (64, 48)
    scene = Image.open(io.BytesIO(httpx.get(url + job["images"][0]["url"]).content))
    assert scene.size == (64, 48)
    assert elsewhere == []


@pytest.fixture
def adapter_library(tiny, tmp_path, monkeypatch):
    """An adapter library with one LoRA for the tiny model (read when the UI is built)."""
    import torch

    from dreamlab.adapters.lora import LoraLayer, LoraWeights, save_lora

    g = torch.Generator().manual_seed(0)
    layers = {name: LoraLayer(torch.randn(2, m.weight.shape[1], generator=g), torch.randn(m.weight.shape[0], 2, generator=g), 1.0)
              for name, m in tiny.unet.named_modules() if name.endswith("attn1.to_q")}
    save_lora(LoraWeights({"unet": layers}), tmp_path / "lib" / "loras" / "ui-lora")
    monkeypatch.setenv("DREAMLAB_ADAPTERS", str(tmp_path / "lib"))


def test_the_adapter_picker_puts_a_lora_into_the_prompt(adapter_library, live, browser):
    import httpx

    url, _ = live
    page, elsewhere = browser
    open_ui(page, url)
    page.locator("#prompt textarea").fill("red apple")
    page.click("#adapters")  # the accordion
    page.locator("#lora-name input").click()
    page.get_by_role("option", name="ui-lora", exact=True).click()
    set_number(page, "lora-scale", 0.5)
    page.click("#lora-add")
    page.wait_for_function("document.querySelector('#prompt textarea').value === 'red apple <lora:ui-lora:0.5>'")
    set_number(page, "steps", 4)
    page.locator("#seed input").fill("7")
    assert generate(page).startswith("done"), page.text_content("#progress")
    items = httpx.get(f"{url}/api/gallery").json()["items"]
    manifest = httpx.get(f"{url}{items[0]['metadata_url']}").json()["manifest"]
    assert manifest["request"]["loras"] == [{"name": "ui-lora", "scale": 0.5}] and manifest["request"]["prompt"] == "red apple"
    assert [(a["kind"], a["name"], a["scale"]) for a in manifest["adapters"]] == [("lora", "ui-lora", 0.5)]
    assert not elsewhere


@pytest.fixture
def instruct_library(tiny, tmp_path, monkeypatch):
    """An instruction model made from the tiny model, installed where the default model looks for one."""
    import json as _json

    import torch

    from dreamlab.models.controlnet import base_hash
    from dreamlab.train.instruct import instruct_unet_from

    folder = tmp_path / "models" / "tiny-instruct"
    import shutil

    shutil.copytree(tiny.source, folder)
    unet = instruct_unet_from(tiny.unet)
    with torch.no_grad():
        unet.conv_in.weight[:, 4:].normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")
    spec = _json.loads((folder / "dreamlab.json").read_text())
    spec.update(name="tiny-instruct", inputs=["source_image"], instruct={"base_unet": base_hash(tiny.files)})
    (folder / "dreamlab.json").write_text(_json.dumps(spec))
    monkeypatch.setenv("DREAMLAB_MODELS", str(folder.parent))
    tiny._editor.clear()  # looked up again when the UI is built
    yield folder
    tiny._editor.clear()


def test_the_instruct_tab_edits_an_uploaded_picture(instruct_library, live, browser, tmp_path):
    import httpx

    url, _ = live
    page, elsewhere = browser
    arr = np.random.default_rng(5).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    arr[..., 3] = 255
    src = tmp_path / "apple.png"
    Image.fromarray(arr, "RGBA").save(src)
    open_ui(page, url)
    page.get_by_role("tab", name="Instruct").click()
    page.click("#generate")  # nothing uploaded yet: a message, no job
    page.wait_for_selector(".toast-body:has-text('upload the image to edit first')")
    page.locator("#prompt textarea").fill("make it blue")
    page.locator("#instruct-image input[type=file]").set_input_files(str(src))
    page.wait_for_selector("#instruct-image img")
    set_number(page, "steps", 4)
    set_number(page, "image-cfg", 1.25)
    page.locator("#seed input").fill("7")
    assert generate(page) == "done: 1 image, seed 7"
    (job,) = httpx.get(f"{url}/api/jobs").json()["items"]
    assert job["request"]["source_image"] == "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    assert job["request"]["image_cfg_scale"] == 1.25 and job["request"]["prompt"] == "make it blue"
    manifest = httpx.get(f"{url}/api/gallery/{job['images'][0]['id']}").json()["manifest"]
    assert manifest["model"]["name"] == "tiny-instruct"
    assert not elsewhere
