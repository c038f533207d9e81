"""`dreamlab serve` as a real process on 127.0.0.1: killed with SIGKILL while jobs are queued and running,
then restarted on the same data folder: every job completes, once, and the interrupted one makes the same
image as an uninterrupted run."""

import signal
import time

import numpy as np
import pytest
from PIL import Image

from dreamlab.generate import generate, make_request
from dreamlab.loading.model import load_model
from dreamlab.models.tiny import make_tiny_model
from server_process import ServerProcess


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def test_sigkill_with_jobs_queued_and_running_loses_nothing(tiny_dir, tmp_path):
    data = tmp_path / "data"
    body = {"prompt": "red apple", "steps": 30, "width": 32, "height": 32, "sampler": "euler_ancestral"}
    server = ServerProcess(tiny_dir, data)
    try:
        ids = [server.client.post("/api/jobs", json={**body, "seed": i}).json()["id"] for i in range(5)]
        deadline = time.monotonic() + 60
        while (first := server.client.get(f"/api/jobs/{ids[0]}").json())["step"] < 2:
            assert first["state"] in ("queued", "running") and time.monotonic() < deadline, first
            time.sleep(0.01)
        states = [server.client.get(f"/api/jobs/{i}").json()["state"] for i in ids]
        assert "running" in states and "queued" in states, states
    finally:
        server.stop(signal.SIGKILL)
    assert server.proc.returncode == -signal.SIGKILL

    server = ServerProcess(tiny_dir, data)
    try:
        deadline = time.monotonic() + 120
        jobs = []
        for job_id in ids:
            while (job := server.client.get(f"/api/jobs/{job_id}").json())["state"] in ("queued", "running"):
                assert time.monotonic() < deadline, job
                time.sleep(0.05)
            jobs.append(job)
        assert [j["state"] for j in jobs] == ["done"] * 5, [j["error"] for j in jobs]
        assert jobs[0]["attempts"] == 2  # it was running when the server died, and ran again from the start
        gallery = server.client.get("/api/gallery", params={"limit": 100}).json()
        assert gallery["total"] == 5 and sorted(im["job_id"] for im in gallery["items"]) == sorted(ids)
        pngs = sorted(p.name for p in (data / "images").glob("*.png"))
        assert pngs == sorted(f"{i}-0.png" for i in ids)
        got = server.client.get(jobs[0]["images"][0]["url"]).content
    finally:
        server.stop()
    assert server.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown

    (tmp_path / "got.png").write_bytes(got)
    expected = generate(load_model(tiny_dir), make_request(**body, seed=0)).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "got.png")), np.asarray(expected))
