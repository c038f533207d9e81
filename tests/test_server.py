"""The HTTP API in-process (FastAPI's TestClient runs the app's lifespan, so the worker thread runs):
jobs, progress, cancellation, validation, limits, the gallery, restarts, and no path traversal; the service
both faces call (its job follower), and the faces importing the service, not each other."""

import asyncio
import base64
import hashlib
import io
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dreamlab.generate import encode_image, generate, make_request
from dreamlab.loading.model import load_model
from dreamlab.metadata import read_manifest
from dreamlab.server.app import create_app
from dreamlab.server.service import JobFinishedError, Limits, Service

TERMINAL = {"done", "failed", "cancelled"}


@pytest.fixture
def client(tiny, tmp_path):
    """The API alone (the Gradio UI costs about half a second per app; test_ui.py and the browser test
    cover it, and test_info_ui_and_openapi the app with both)."""
    with TestClient(create_app(tiny, tmp_path / "data", ui=False)) as c:
        yield c


def wait(client, job_id, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in TERMINAL:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {job}")


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def slow_steps(app, seconds):
    """Make every step of the worker take at least ``seconds`` (so progress can be watched)."""
    store = app.state.server.store
    original = store.set_progress

    def slowed(*args, **kwargs):
        time.sleep(seconds)
        original(*args, **kwargs)

    store.set_progress = slowed


def source_image(size=16):
    arr = np.random.default_rng(0).integers(0, 256, (size, size, 4), dtype=np.uint8)
    arr[..., 3] = 255
    return Image.fromarray(arr, "RGBA")


def test_text_to_image_matches_generate_bit_for_bit(client, tiny):
    body = {"prompt": "red apple", "negative_prompt": "blurry", "steps": 4, "seed": 11, "batch": 2, "sampler": "euler_ancestral"}
    r = client.post("/api/jobs", json=body)
    assert r.status_code == 202 and r.json()["state"] in ("queued", "running")
    job = wait(client, r.json()["id"])
    assert job["state"] == "done" and job["step"] == job["total"] == 4
    assert [im["seed"] for im in job["images"]] == [11, 12]
    expected = generate(tiny, make_request(**body))
    for im, ref in zip(job["images"], expected.images, strict=True):
        png = client.get(im["url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert np.array_equal(png_array(png.content), np.asarray(ref))
        chunks = Image.open(io.BytesIO(png.content)).text
        assert chunks["parameters"].startswith("red apple\nNegative prompt: blurry\nSteps: 4, Sampler: euler_ancestral")
        assert json.loads(chunks["dreamlab"])["seed"] == im["seed"]


def test_a_seedless_request_gets_its_seed_fixed_at_submission(client):
    r = client.post("/api/jobs", json={"prompt": "x", "steps": 1})
    seed = r.json()["request"]["seed"]
    assert isinstance(seed, int)
    assert wait(client, r.json()["id"])["images"][0]["seed"] == seed


def test_img2img_and_inpainting_record_their_inputs(client, tiny):
    src = encode_image(source_image())
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, 8:] = 255
    mask_b64 = encode_image(Image.fromarray(mask, "L"))
    body = {"prompt": "x", "steps": 4, "seed": 3, "init_image": src, "mask_image": "data:image/png;base64," + mask_b64, "strength": 1.0}
    job = wait(client, client.post("/api/jobs", json=body).json()["id"])
    assert job["state"] == "done", job
    expected = generate(tiny, make_request(**{**body, "mask_image": mask_b64}))
    out = png_array(client.get(job["images"][0]["url"]).content)
    assert np.array_equal(out, np.asarray(expected.images[0]))
    assert np.array_equal(out[:, :8], np.asarray(source_image())[:, :8])  # the known half is kept
    manifest = client.get(f"/api/gallery/{job['images'][0]['id']}").json()["manifest"]
    for key, b64 in (("init_image", src), ("mask_image", mask_b64)):
        recorded = manifest["request"][key]  # = sha256sum of the file that was sent
        assert recorded == job["request"][key] == "sha256:" + hashlib.sha256(base64.b64decode(b64)).hexdigest()
        kept = client.get(f"/api/inputs/{recorded.removeprefix('sha256:')}")
        assert kept.status_code == 200 and base64.b64encode(kept.content).decode() == b64


def test_progress_streams_steps_and_previews(tiny, tmp_path):
    app = create_app(tiny, tmp_path / "data", preview_every=1, ui=False)
    slow_steps(app, 0.12)
    with TestClient(app) as client:
        job_id = client.post("/api/jobs", json={"prompt": "red apple", "steps": 6, "seed": 1}).json()["id"]
        events = []
        with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            name = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
        polled = client.get(f"/api/jobs/{job_id}").json()
    assert events[-1][0] == "end" and events[-1][1]["state"] == "done" and polled["state"] == "done"
    steps = [e["step"] for name, e in events if e["state"] == "running"]
    assert steps == sorted(steps) and len(set(steps)) >= 3 and max(steps) <= 6
    previews = [e["preview"] for _, e in events if "preview" in e]
    assert previews, "no preview was streamed"
    preview = Image.open(io.BytesIO(base64.b64decode(previews[0].partition(",")[2])))
    assert preview.format == "PNG" and max(preview.size) <= 96


def test_preview_can_be_polled_while_running(tiny, tmp_path):
    app = create_app(tiny, tmp_path / "data", preview_every=1, ui=False)
    slow_steps(app, 0.1)
    with TestClient(app) as client:
        job_id = client.post("/api/jobs", json={"prompt": "x", "steps": 40, "seed": 1}).json()["id"]
        deadline = time.monotonic() + 30
        while (job := client.get(f"/api/jobs/{job_id}").json())["preview_url"] is None:
            assert time.monotonic() < deadline and job["state"] not in TERMINAL
            time.sleep(0.02)
        assert job["state"] == "running" and 1 <= job["step"] < job["total"] == 40
        r = client.get(job["preview_url"])
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).format == "PNG"
        client.post(f"/api/jobs/{job_id}/cancel")
        assert wait(client, job_id)["state"] == "cancelled"


def test_cancel_queued_and_running_jobs(tiny, tmp_path):
    app = create_app(tiny, tmp_path / "data", ui=False)
    slow_steps(app, 0.05)
    with TestClient(app) as client:
        running = client.post("/api/jobs", json={"prompt": "a", "steps": 100, "seed": 1}).json()["id"]
        queued = client.post("/api/jobs", json={"prompt": "b", "steps": 2, "seed": 1}).json()["id"]
        deadline = time.monotonic() + 30
        while client.get(f"/api/jobs/{running}").json()["step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get(f"/api/jobs/{queued}").json()["position"] == 0
        r = client.post(f"/api/jobs/{queued}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        assert client.post(f"/api/jobs/{running}/cancel").status_code == 200
        job = wait(client, running)
        assert job["state"] == "cancelled" and job["images"] == [] and job["step"] == 0
        r = client.post(f"/api/jobs/{running}/cancel")
        assert r.status_code == 409 and "already cancelled" in r.json()["detail"]
        assert client.get("/api/gallery").json()["total"] == 0


@pytest.mark.parametrize(
    "body,needle",
    [
        ({"sampler": "nope"}, "unknown sampler 'nope'"),
        ({"steps": 0}, "steps: "),
        ({"steps": 151}, "steps: at most 150 on this server"),
        ({"batch": 9}, "batch: at most 8"),
        ({"batch": 100}, "batch: "),
        ({"width": 17}, "size 17x16 is not divisible by the model's factor 2"),
        ({"width": 2048}, "width: at most 1024"),
        ({"prompt": "a" * 1001}, "prompt: at most 1000 characters"),
        ({"prompt": "a" * 3000}, "prompt: "),
        ({"cfg_scale": -1}, "cfg_scale: "),
        ({"schedule": "weird"}, "schedule: "),
        ({"mask_image": encode_image(source_image())}, "mask_image needs an init_image"),
        ({"init_image": "%%%"}, "init_image: not valid base64"),
        ({"init_image": base64.b64encode(b"not an image").decode()}, "init_image: not a readable image"),
        ({"sampler": "euler", "eta": 0.5}, "sampler 'euler' takes no eta"),
        ({"seed": 2**63 - 1, "batch": 2}, "seed + batch - 1 exceeds 2**63 - 1"),
        ({"steps": 151, "batch": 9}, "steps: at most 150 on this server; batch: at most 8 on this server"),
        ({"seed": 2**64}, "seed: "),
        ({"nonsense": 1}, "nonsense: Extra inputs are not permitted"),
        ({"prompt": 5}, "prompt: "),
        ({"prompt": "a AND  AND b"}, "prompt: part 2 of the prompt (between ANDs) is empty"),
        ({"prompt": " AND ".join("abcdefghi")}, "prompt: the prompt composes 9 parts with AND; at most 8"),
    ],
)
def test_bad_requests_get_422_with_a_one_line_message(client, body, needle):
    r = client.post("/api/jobs", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and needle in detail and "\n" not in detail


def test_malformed_bodies_are_4xx_never_5xx(client):
    headers = {"content-type": "application/json"}
    for raw in [b"{bad json", b"[]", b"null", b'"x"', b'{"prompt": "\\ud800"}', b"\xff\xfe", b""]:
        r = client.post("/api/jobs", content=raw, headers=headers)
        assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)
        assert isinstance(r.json()["detail"], str)


def test_body_size_and_queue_length_are_bounded(tiny, tmp_path):
    limits = Limits(max_body_bytes=10_000, max_queue=2)
    with TestClient(create_app(tiny, tmp_path / "data", limits=limits, run_worker=False, ui=False)) as client:
        big = {"prompt": "x", "init_image": "A" * 20_000}
        assert client.post("/api/jobs", json=big).status_code == 413
        chunked = client.post("/api/jobs", content=iter([json.dumps(big).encode()]), headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert client.post("/api/jobs", json={"steps": 1}).status_code == 202
        assert client.post("/api/jobs", json={"steps": 1}).status_code == 202
        r = client.post("/api/jobs", json={"steps": 1})
        assert r.status_code == 429 and "queue is full" in r.json()["detail"] and r.headers["retry-after"]


def test_gallery_lists_searches_fetches_and_deletes(client, tmp_path):
    ids = {}
    for prompt in ["red apple", "green apple", "blue car", "100%_sure"]:
        ids[prompt] = client.post("/api/jobs", json={"prompt": prompt, "steps": 1, "seed": 1}).json()["id"]
    for job_id in ids.values():
        assert wait(client, job_id)["state"] == "done"
    page = client.get("/api/gallery").json()
    assert page["total"] == 4 and len({im["id"] for im in page["items"]}) == 4
    assert {im["prompt"] for im in client.get("/api/gallery", params={"q": "APPLE"}).json()["items"]} == {"red apple", "green apple"}
    assert [im["prompt"] for im in client.get("/api/gallery", params={"q": "%_"}).json()["items"]] == ["100%_sure"]
    assert client.get("/api/gallery", params={"q": "_"}).json()["total"] == 1  # wildcards are literal
    assert len(client.get("/api/gallery", params={"limit": 2, "offset": 1}).json()["items"]) == 2

    image_id = f"{ids['blue car']}-0"
    meta = client.get(f"/api/gallery/{image_id}").json()
    assert meta["manifest"]["request"]["prompt"] == "blue car" and "Seed: 1" in meta["parameters"]
    files = sorted(p.name for p in (tmp_path / "data" / "images").iterdir())
    assert f"{image_id}.png" in files and len(files) == 4
    assert client.delete(f"/api/gallery/{image_id}").status_code == 204
    assert not (tmp_path / "data" / "images" / f"{image_id}.png").exists()
    for url in (f"/api/gallery/{image_id}", f"/api/gallery/{image_id}/image"):
        assert client.get(url).status_code == 404
    assert client.delete(f"/api/gallery/{image_id}").status_code == 404
    assert client.get("/api/gallery").json()["total"] == 3


def test_path_traversal_never_reaches_the_filesystem(client, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    job = wait(client, client.post("/api/jobs", json={"prompt": "x", "steps": 1}).json()["id"])
    image_id = job["images"][0]["id"]
    attempts = [
        "../secret.txt", "..%2Fsecret.txt", "..%2F..%2Fsecret.txt", "%2e%2e%2fsecret.txt", "....//secret.txt",
        f"{image_id}%2F..%2F..%2Fsecret.txt", f"{image_id}/../../secret.txt", "%00", "..", ".", "%2e%2e",
        f"{image_id[:-2]}-0%00", f"../{image_id}", f"{image_id}.png", str(secret), "%2F" + str(secret).lstrip("/"),
    ]
    for attempt in attempts:
        for route in ("/api/gallery/{}", "/api/gallery/{}/image", "/api/inputs/{}", "/api/jobs/{}"):
            url = route.format(attempt)
            r = client.get(url)
            if r.status_code == 200:  # a dot segment the client resolved: /api/gallery/. is the listing
                assert "items" in r.json(), url
            else:
                assert r.status_code in (400, 404), (url, r.status_code)
            assert b"TOP SECRET" not in r.content
            if "gallery" in route:
                assert client.delete(url).status_code in (400, 404, 405)


def test_jobs_survive_a_restart(tiny, tmp_path):
    data = tmp_path / "data"
    with TestClient(create_app(tiny, data, run_worker=False, ui=False)) as client:
        ids = [client.post("/api/jobs", json={"prompt": f"p{i}", "steps": 2, "seed": i}).json()["id"] for i in range(3)]
        store = client.app.state.server.store
        interrupted = store.claim()  # as if the server died while running it
        assert interrupted.id == ids[0] and interrupted.state == "running"
        cancelled = store.claim()
        store.cancel(cancelled.id)  # cancellation asked for, then the server died
    with TestClient(create_app(tiny, data, ui=False)) as client:
        jobs = [wait(client, i) for i in ids]
        assert [j["state"] for j in jobs] == ["done", "cancelled", "done"]
        assert jobs[0]["attempts"] == 2 and jobs[2]["attempts"] == 1
        assert client.get("/api/gallery").json()["total"] == 2


def test_stopping_the_server_puts_the_running_job_back_in_the_queue(tiny, tmp_path):
    from dreamlab.server.queue import JobStore

    app = create_app(tiny, tmp_path / "data", ui=False)
    slow_steps(app, 0.05)
    with TestClient(app) as client:
        job_id = client.post("/api/jobs", json={"prompt": "x", "steps": 100, "seed": 1}).json()["id"]
        deadline = time.monotonic() + 30
        while client.get(f"/api/jobs/{job_id}").json()["step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    store = JobStore(tmp_path / "data" / "dreamlab.sqlite3")
    job = store.get(job_id)
    store.close()
    assert job.state == "queued" and job.attempts == 0


def test_a_job_that_keeps_killing_the_server_fails_after_three_attempts(tiny, tmp_path):
    data = tmp_path / "data"
    with TestClient(create_app(tiny, data, run_worker=False, ui=False)) as client:
        job_id = client.post("/api/jobs", json={"steps": 1}).json()["id"]
    for _ in range(3):
        with TestClient(create_app(tiny, data, run_worker=False, ui=False)) as client:
            client.app.state.server.store.claim()
    with TestClient(create_app(tiny, data, run_worker=False, ui=False)) as client:
        job = client.get(f"/api/jobs/{job_id}").json()
        assert job["state"] == "failed" and "gave up after 3 attempts" in job["error"]


def test_one_server_per_data_folder(tiny, tmp_path):
    from dreamlab.errors import DreamlabError

    with TestClient(create_app(tiny, tmp_path / "data", run_worker=False, ui=False)):
        with pytest.raises(DreamlabError, match="another dreamlab server is using"):
            create_app(tiny, tmp_path / "data", ui=False)
    with TestClient(create_app(tiny, tmp_path / "data", run_worker=False, ui=False)):  # free again once stopped
        pass


def test_a_failing_job_records_its_error_and_the_worker_goes_on(tiny_dir, tmp_path):
    broken = load_model(tiny_dir)
    broken.unet.conv_out.bias.data.fill_(float("nan"))
    with TestClient(create_app(broken, tmp_path / "data", ui=False)) as client:
        first = client.post("/api/jobs", json={"prompt": "x", "steps": 2, "seed": 1}).json()["id"]
        second = client.post("/api/jobs", json={"prompt": "y", "steps": 2, "seed": 1}).json()["id"]
        for job_id in (first, second):
            job = wait(client, job_id)
            assert job["state"] == "failed" and "NaN or Inf" in job["error"] and job["images"] == []
        assert client.get("/api/info").json()["worker_alive"]


def test_info_ui_and_openapi(tiny, tmp_path):
    with TestClient(create_app(tiny, tmp_path / "data")) as client:  # with the Gradio UI at /
        info = client.get("/api/info").json()
        assert info["model"]["name"] == "tiny-random" and "dpmpp_2m" in info["samplers"] and info["worker_alive"]
        assert info["limits"]["max_steps"] == 150
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        config = client.get("/config").json()  # the Gradio app's layout
        ids = {c["props"].get("elem_id") for c in config["components"]}
        assert {"prompt", "generate", "progress", "preview", "mask-editor", "gallery", "control-image"} <= ids
        assert "No ControlNet for this model is installed" in json.dumps(config)
        schema = client.get("/openapi.json").json()
        assert {"/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/events", "/api/jobs/{job_id}/cancel",
                "/api/gallery", "/api/gallery/{image_id}", "/api/gallery/{image_id}/image"} <= set(schema["paths"])
        assert all(path.startswith(("/api/", "/sdapi/v1/")) for path in schema["paths"])  # the UI's are not the API's
        for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):  # offline docs
            r = client.get(page)
            assert r.status_code == 200 and r.headers["content-security-policy"].startswith("default-src 'self'")
            assert f"/docs-assets/{asset}" in r.text and "http" not in r.text.replace("http-equiv", "")
            assert client.get(f"/docs-assets/{asset}").status_code == 200
        assert "GenerationRequest" in schema["components"]["schemas"]
        for url in ("/api/nope", "/api/jobs/" + "0" * 32):  # unknown API paths stay JSON 404s under the mount
            r = client.get(url)
            assert r.status_code == 404 and isinstance(r.json()["detail"], str)
    with TestClient(create_app(tiny, tmp_path / "api-only", ui=False)) as client:
        assert client.get("/").status_code == 404 and client.get("/api/health").status_code == 200


def test_png_from_the_server_carries_a_replayable_manifest(client, tmp_path):
    job = wait(client, client.post("/api/jobs", json={"prompt": "red apple", "steps": 2, "seed": 4}).json()["id"])
    path = tmp_path / "out.png"
    path.write_bytes(client.get(job["images"][0]["url"]).content)
    manifest = read_manifest(path)
    assert manifest["request"]["seed"] == 4 and manifest["request"]["batch"] == 1
    assert "unet/diffusion_pytorch_model.safetensors" in manifest["model"]["files"]


def test_serve_command_errors_are_one_line(tiny, tiny_dir, tmp_path, capsys):
    from dreamlab.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing"), "--data", str(tmp_path / "d")]) == 2
    assert "no model at" in capsys.readouterr().err
    with TestClient(create_app(tiny, tmp_path / "data", run_worker=False, ui=False)):
        assert main(["serve", "--model", str(tiny_dir), "--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: another dreamlab server is using") and "\n" not in err


def test_super_resolution_jobs_record_their_input_and_respect_the_size_limit(tmp_path):
    from dreamlab.models.tiny import make_tiny_model

    sr = load_model(make_tiny_model(tmp_path / "sr", sample_size=16, sr_from=8))
    low = encode_image(source_image(8))
    with TestClient(create_app(sr, tmp_path / "data", ui=False, limits=Limits(max_side=32))) as client:
        job = wait(client, client.post("/api/jobs", json={"prompt": "x", "steps": 2, "seed": 1, "lowres_image": low}).json()["id"])
        assert job["state"] == "done", job
        assert (job["images"][0]["width"], job["images"][0]["height"]) == (16, 16)
        expected = generate(sr, make_request(prompt="x", steps=2, seed=1, lowres_image=low))
        assert np.array_equal(png_array(client.get(job["images"][0]["url"]).content), np.asarray(expected.images[0]))
        recorded = job["request"]["lowres_image"]
        assert recorded == "sha256:" + hashlib.sha256(base64.b64decode(low)).hexdigest()
        assert client.get(f"/api/inputs/{recorded.removeprefix('sha256:')}").status_code == 200
        big = client.post("/api/jobs", json={"prompt": "x", "steps": 2, "lowres_image": encode_image(source_image(24))})
        assert big.status_code == 422 and "the output would be 48, at most 32" in big.json()["detail"]
        missing = client.post("/api/jobs", json={"prompt": "x", "steps": 2})
        assert missing.status_code == 422 and "lowres_image" in missing.json()["detail"]


def test_follow_reads_the_job_only_when_the_store_changed_and_ends_with_the_final_update(tiny, tmp_path):
    srv = Service(tiny, tmp_path / "data", Limits(), preview_every=0)  # no worker: the job stays queued
    try:
        job = srv.submit(make_request(prompt="x", steps=1))
        reads = []
        get = srv.store.get

        def counted(job_id, *, with_request=True):
            if not with_request:  # follow's reads (submit reads the job it made with its request)
                reads.append(job_id)
            return get(job_id, with_request=with_request)

        srv.store.get = counted

        async def updates(polls: int) -> list:
            seen, answers = [], iter([False] * polls + [True])

            async def stop() -> bool:  # "the client went away" after this many polls
                return next(answers)

            async for update in srv.follow(job.id, poll=0.001, stop=stop):
                seen.append(update)
                srv.submit(make_request(prompt="y", steps=1))  # a store change that leaves this job's view as it is
            return seen

        (update,) = asyncio.run(updates(50))
        assert (update.view.state, update.view.position, update.final, update.new_preview) == ("queued", 0, False, None)
        assert reads == [job.id] * 2  # the first look, and once after the other submission; not on each of 50 polls
        srv.cancel(job.id)
        (update,) = asyncio.run(updates(50))  # an ended job: its final update at once, then nothing
        assert update.final and update.view.state == "cancelled" and update.view.position is None
        with pytest.raises(JobFinishedError, match=f"job {job.id} is already cancelled"):
            srv.cancel(job.id)
        assert srv.cancel("0" * 32) is None
    finally:
        srv.stop()


def test_the_two_faces_import_the_service_not_each_other():
    """ui.py never imports app.py (no cycle); app.py imports neither Gradio nor ui.py until create_app mounts
    the UI (so --no-ui never pays for Gradio); the service knows neither face's framework, and neither imports
    redis or dramatiq unless a Redis queue is asked for. Each run imports
    the modules in order in a fresh interpreter and names the ones of the rest already imported."""
    code = """if True:
        import importlib, json, sys
        for module, absent in json.loads(sys.argv[1]):
            importlib.import_module(module)
            print(module, *(m for m in absent if m in sys.modules))"""
    runs = [
        [("dreamlab.server.service", ["fastapi", "starlette", "gradio", "dreamlab.server.app", "dreamlab.server.ui",
                                      "redis", "dramatiq"]),
         ("dreamlab.server.app", ["gradio", "dreamlab.server.ui", "redis", "dramatiq"])],
        [("dreamlab.server.ui", ["dreamlab.server.app"])],
    ]
    for steps in runs:
        out = subprocess.run([sys.executable, "-c", code, json.dumps(steps)], capture_output=True, text=True, check=True)
        assert out.stdout.splitlines() == [module for module, _ in steps], out.stdout
