"""The Redis job queue (``dreamlab serve --queue redis://...`` and ``dreamlab worker``) against a real
redis-server on a free loopback port (tests/redis_server.py; skipped without one, except under
DREAMLAB_REQUIRE_REDIS=1, which .ci/run sets): the job records' rules (a worker taken for dead cannot
finish a job its replacement runs; attempts; cancel; release), the API with its own worker (progress,
previews, cancellation, images byte for byte those of the embedded queue), and real processes: two
workers, 50 jobs from 10 clients, one worker SIGKILLed mid-job; then the Redis server SIGKILLed and
restarted mid-queue."""

import io
import json
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from dreamlab.cli import main
from dreamlab.errors import DreamlabError
from dreamlab.generate import generate, make_request
from dreamlab.server.app import create_app
from dreamlab.server.redis_queue import RedisQueue
from dreamlab.server.redis_worker import RedisWorker
from redis_server import RedisServer, require_redis_server
from server_process import ServerProcess, WorkerProcess, free_port

TERMINAL = {"done", "failed", "cancelled"}
HEARTBEAT = "5"  # seconds; more than dramatiq's 3 s consumer restart after a lost connection


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def url(redis_server):
    redis_server.client().flushdb()
    return redis_server.url


def field(r, job_id: str, name: str) -> str | None:
    value = r.hget(f"dreamlab:job:{job_id}", name)
    return value.decode() if value is not None else None


# --- the job records' rules (two RedisQueue objects play two workers) ---------------------------------


def test_a_worker_taken_for_dead_cannot_finish_the_job_its_replacement_runs(url, redis_server):
    a, b = RedisQueue(url), RedisQueue(url)
    job_id = a.submit({"prompt": "x"}, max_queue=10)
    assert a.get(job_id).state == "queued" and a.position(a.get(job_id).id) == 0
    assert a.claim(job_id).attempts == 1 and not a.cancel_requested(job_id)
    job = b.claim(job_id)  # its message delivered again: dramatiq took a for dead
    assert job.state == "running" and job.attempts == 2
    assert a.cancel_requested(job_id)  # a learns at its next step that its attempt is void...
    assert not a.deliver(job_id, [b"a's png"], [{}])  # ...and if it finishes anyway, its images are refused
    assert b.deliver(job_id, [b"b's png"], [{}])
    assert b.claim(job_id) is None  # a third delivery: its images are in, nothing to run
    assert field(redis_server.client(), job_id, "deliveries") == "1" and a.stats() == {"delivered": 1, "rejected": 1}
    assert redis_server.client().hget(f"dreamlab:result:{job_id}", "png:0") == b"b's png"


def test_a_job_whose_workers_keep_dying_fails_after_max_attempts(url):
    q = RedisQueue(url, max_attempts=2)
    job_id = q.submit({"prompt": "x"}, max_queue=10)
    assert q.claim(job_id).attempts == 1 and q.claim(job_id).attempts == 2
    assert q.claim(job_id) is None
    job = q.get(job_id)
    assert job.state == "failed" and job.error.startswith("gave up after 2 attempts")


def test_cancel_release_and_orphans(url):
    q = RedisQueue(url)
    queued, running = q.submit({"prompt": "x"}, 10), q.submit({"prompt": "y"}, 10)
    assert q.cancel(queued) == "queued" and q.get(queued).state == "cancelled"
    assert q.claim(queued) is None  # its message is dropped when it comes
    q.claim(running)
    assert q.cancel(running) == "running" and q.cancel_requested(running)
    q.mark_cancelled(running)
    assert q.get(running).state == "cancelled" and q.counts() == {"cancelled": 2}
    job_id = q.submit({"prompt": "z"}, 10)
    q.claim(job_id)
    token = q._tokens[job_id]
    assert q._call("claim", job_id, token, 3) == b"claimed" and q.get(job_id).attempts == 1  # a retried claim
    q.release(job_id)  # a worker stopping: back to the queue, the attempt not counted
    job = q.get(job_id)
    assert job.state == "queued" and job.attempts == 0 and q.position(job_id) == 0
    assert q._call("release", job_id, token) == 1  # retried after a lost answer: the same answer, so a new
    assert q.get(job_id).attempts == 0  # message is sent, and nothing changes twice
    assert q.claim("f" * 32, wait=0.2) is None  # a message whose submission failed before its record was written
    with pytest.raises(Exception, match="the queue is full"):
        q.submit({"prompt": "w"}, max_queue=1)


def test_a_bad_queue_url_or_an_unreachable_server_is_one_line_and_exit_2(capsys):
    for argv, message in (
        (["worker", "--queue", "http://localhost:6379"], "error: --queue http://localhost:6379: expected redis://HOST:PORT/DB"),
        (["worker", "--queue", f"redis://:secret@127.0.0.1:{free_port()}/0"], "error: cannot reach the Redis server at redis://:***@127.0.0.1:"),
        (["serve", "--queue", "redis://127.0.0.1:6379/x"], "error: --queue redis://127.0.0.1:6379/x: expected redis://"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1 and "secret" not in err, err
    with pytest.raises(DreamlabError, match="expected redis://"):
        RedisQueue("sqlite:///x")


# --- the API with its own worker, in-process ----------------------------------------------------------


def test_progress_previews_and_cancellation_through_redis(tiny, url, tmp_path):
    app = create_app(tiny, tmp_path / "data", preview_every=1, ui=False, queue=url)
    queue = app.state.server.worker.queue
    set_progress = queue.set_progress
    queue.set_progress = lambda *a, **k: (time.sleep(0.1), set_progress(*a, **k))  # steps slow enough to watch
    with TestClient(app) as client:
        job_id = client.post("/api/jobs", json={"prompt": "red apple", "steps": 6, "seed": 1}).json()["id"]
        events = []
        with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        steps = [e["step"] for e in events if e["state"] == "running"]
        assert steps == sorted(steps) and len(set(steps)) >= 3, steps
        assert any(e.get("preview", "").startswith("data:image/png;base64,") for e in events)
        assert events[-1]["state"] == "done" and len(events[-1]["images"]) == 1

        job_id = client.post("/api/jobs", json={"prompt": "x", "steps": 100, "seed": 2}).json()["id"]
        while client.get(f"/api/jobs/{job_id}").json()["step"] < 2:
            time.sleep(0.02)
        assert client.post(f"/api/jobs/{job_id}/cancel").json()["state"] == "running"
        deadline = time.monotonic() + 30
        while (job := client.get(f"/api/jobs/{job_id}").json())["state"] not in TERMINAL:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert job["state"] == "cancelled" and job["images"] == [] and job["step"] < 100
        assert client.get("/api/info").json()["queue"] == {"done": 1, "cancelled": 1}


def test_a_job_longer_than_the_heartbeat_timeout_stays_with_its_worker(tiny, url, tmp_path):
    """Each worker process heartbeats from dramatiq's consumer threads while its job runs, so the other,
    idle and looking for dead workers on each of its polls, never takes a live worker's long job."""
    app = create_app(tiny, tmp_path / "data", ui=False, queue=RedisQueue(url, heartbeat_timeout=1.0))
    other = RedisWorker(tiny, RedisQueue(url, heartbeat_timeout=1.0))
    for queue in (app.state.server.worker.queue, other.queue):
        queue.set_progress = lambda *a, _set=queue.set_progress, **k: (time.sleep(0.15), _set(*a, **k))
    other.start()
    try:
        with TestClient(app) as client:
            ids = [client.post("/api/jobs", json={"prompt": "x", "steps": steps, "seed": i}).json()["id"]
                   for i, steps in enumerate((20, 2, 2, 2))]  # one long job; the other worker runs the rest, then idles
            deadline = time.monotonic() + 60
            jobs = []
            for job_id in ids:
                while (job := client.get(f"/api/jobs/{job_id}").json())["state"] not in TERMINAL:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                jobs.append(job)
    finally:
        other.stop()
    assert [(j["state"], j["attempts"]) for j in jobs] == [("done", 1)] * 4
    assert jobs[0]["finished"] - jobs[0]["started"] > 2.5  # it ran for more than twice the heartbeat timeout
    assert max(j["finished"] for j in jobs[1:]) < jobs[0]["finished"] - 1.0  # while the other worker idled
    assert other.queue.stats() == {"delivered": 4}


def test_a_stopping_worker_puts_its_job_back_uncounted_for_another(tiny, url, redis_server):
    """SIGTERM or Ctrl-C: the running job stops at its next step and goes back to the queue, with a new
    message and its attempt not counted; another worker runs it."""
    r = redis_server.client()

    def until(condition):
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    first = RedisWorker(tiny, RedisQueue(url))
    first.queue.set_progress = lambda *a, _set=first.queue.set_progress, **k: (time.sleep(0.05), _set(*a, **k))
    first.start()
    job_id = first.queue.submit({"prompt": "x", "steps": 30, "seed": 1}, max_queue=10)
    until(lambda: int(r.hget(f"dreamlab:progress:{job_id}", "step") or 0) >= 2)
    first.stop()
    job = first.queue.get(job_id)
    assert (job.state, job.attempts, first.queue.position(job_id)) == ("queued", 0, 0)
    second = RedisWorker(tiny, RedisQueue(url))
    second.start()
    try:
        until(lambda: field(r, job_id, "delivered") is not None)
    finally:
        second.stop()
    assert second.queue.get(job_id).attempts == 1 and field(r, job_id, "deliveries") == "1"


def test_images_are_byte_for_byte_those_of_the_embedded_queue(tiny, url, tmp_path):
    body = {"prompt": "red apple", "negative_prompt": "blurry", "steps": 5, "seed": 7, "batch": 2,
            "sampler": "euler_ancestral"}
    pngs = []
    for name, queue in (("sqlite", None), ("redis", url)):
        with TestClient(create_app(tiny, tmp_path / name, ui=False, queue=queue)) as client:
            job_id = client.post("/api/jobs", json=body).json()["id"]
            while (job := client.get(f"/api/jobs/{job_id}").json())["state"] not in TERMINAL:
                time.sleep(0.02)
            assert job["state"] == "done"
            pngs.append([client.get(im["url"]).content for im in job["images"]])
    assert pngs[0] == pngs[1]  # the same bytes: pixels, parameters chunk and manifest
    expected = generate(tiny, make_request(**body)).images
    assert all(np.array_equal(np.asarray(Image.open(io.BytesIO(p))), np.asarray(e)) for p, e in zip(pngs[1], expected, strict=True))


# --- real processes: an API node and two `dreamlab worker`s -----------------------------------------


@pytest.fixture(scope="module")
def cluster(tiny_dir, redis_server, tmp_path_factory):
    """``dreamlab serve --queue URL --no-worker`` and two ``dreamlab worker --queue URL`` (Redis database 1;
    the tests above use 0), shared by the two tests below: starting three processes takes most of their time."""
    url = redis_server.url.removesuffix("/0") + "/1"
    r = redis.Redis(port=redis_server.port, db=1)
    r.flushdb()
    folder = tmp_path_factory.mktemp("cluster")
    workers = [WorkerProcess(tiny_dir, url, folder, "--heartbeat-timeout", HEARTBEAT) for _ in range(2)]
    server = ServerProcess(tiny_dir, folder / "data", "--queue", url, "--no-worker", "--heartbeat-timeout", HEARTBEAT)
    for w in workers:
        w.wait_ready()
    yield Cluster(server, workers, folder / "data", r)
    for w in workers:
        w.stop()
    server.stop()


@dataclass
class Cluster:
    server: ServerProcess
    workers: list[WorkerProcess]
    data: Path
    redis: redis.Redis

    def submit(self, bodies: list[dict], clients: int) -> list[str]:
        """Each client thread submits its share of the jobs; the ids in the order of ``bodies``."""
        ids: list[str | None] = [None] * len(bodies)

        def client(k: int) -> None:
            with httpx.Client(base_url=self.server.url, timeout=30) as c:
                for i in range(k, len(bodies), clients):
                    r = c.post("/api/jobs", json=bodies[i])
                    assert r.status_code == 202, r.text
                    ids[i] = r.json()["id"]

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(ids), "a submission failed"
        return ids  # type: ignore[return-value]

    def wait_all(self, ids: list[str], timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        jobs = []
        for job_id in ids:
            while (job := self.server.client.get(f"/api/jobs/{job_id}").json())["state"] not in TERMINAL:
                assert time.monotonic() < deadline, job
                time.sleep(0.05)
            jobs.append(job)
        return jobs

    def check_done_once(self, jobs: list[dict]) -> None:
        """Every job done, its images accepted once, its one image once in the API node's gallery and disk."""
        ids = [j["id"] for j in jobs]
        assert [j["state"] for j in jobs] == ["done"] * len(jobs), [j["error"] for j in jobs if j["error"]]
        assert [field(self.redis, i, "deliveries") for i in ids] == ["1"] * len(ids)
        gallery = self.server.client.get("/api/gallery", params={"limit": 200}).json()["items"]
        assert sorted(im["job_id"] for im in gallery if im["job_id"] in set(ids)) == sorted(ids)
        assert all((self.data / "images" / f"{i}-0.png").is_file() for i in ids)
        assert not list((self.data / "images").glob(".tmp-*"))


BODY = {"prompt": "red apple", "steps": 24, "width": 32, "height": 32, "sampler": "euler_ancestral"}


def test_redis_restarted_mid_queue_loses_nothing(cluster, redis_server):
    ids = cluster.submit([{**BODY, "seed": 100 + i} for i in range(24)], clients=6)
    while cluster.server.client.get("/api/info").json()["queue"].get("done", 0) < 4:
        time.sleep(0.02)
    redis_server.restart(signal.SIGKILL)  # its append-only file has every acknowledged write
    jobs = cluster.wait_all(ids, timeout=60)
    cluster.check_done_once(jobs)
    assert {j["attempts"] for j in jobs} == {1}  # the running ones waited for Redis, and went on
    assert cluster.server.client.post("/api/jobs", json={**BODY, "seed": 1}).status_code == 202  # and it goes on


def test_two_workers_50_jobs_10_clients_one_worker_sigkilled_mid_job(cluster, tiny):
    victim, survivor = cluster.workers
    r = cluster.redis
    cluster.wait_all([i.decode() for i in r.zrange("dreamlab:jobs", 0, -1)], timeout=30)  # the last test's
    delivered = int(r.hget("dreamlab:stats", "delivered") or 0)
    ids = cluster.submit([{**BODY, "seed": i} for i in range(50)], clients=10)
    victim_name = f"{socket.gethostname()}:{victim.proc.pid}:"
    deadline = time.monotonic() + 60
    killed = None
    while killed is None:  # one of the victim's jobs, between its second step and its last few
        assert time.monotonic() < deadline, "the victim never ran a job"
        for job_id in r.zrange("dreamlab:q:running", 0, -1):
            job_id = job_id.decode()
            step = r.hget(f"dreamlab:progress:{job_id}", "step")
            if (field(r, job_id, "owner") or "").startswith(victim_name) and step and 2 <= int(step) <= BODY["steps"] - 6:
                victim.stop(signal.SIGKILL)
                killed = job_id
                break
        time.sleep(0.005)
    assert victim.proc.returncode == -signal.SIGKILL
    assert field(r, killed, "state") == "running" and field(r, killed, "owner").startswith(victim_name)

    jobs = cluster.wait_all(ids, timeout=60)
    cluster.check_done_once(jobs)  # all 50, none lost, each once
    attempts = {j["id"]: j["attempts"] for j in jobs}
    assert attempts.pop(killed) == 2 and set(attempts.values()) == {1}  # the killed job reran once, no other
    assert field(r, killed, "owner").startswith(f"{socket.gethostname()}:{survivor.proc.pid}:")
    assert int(r.hget("dreamlab:stats", "delivered")) - delivered == 50 and r.hget("dreamlab:stats", "rejected") is None
    for job in (jobs[ids.index(killed)], jobs[0]):  # the rerun job's image is bit for bit an uninterrupted run's
        got = np.asarray(Image.open(io.BytesIO(cluster.server.client.get(job["images"][0]["url"]).content)))
        assert np.array_equal(got, np.asarray(generate(tiny, make_request(**BODY, seed=job["request"]["seed"])).images[0]))
