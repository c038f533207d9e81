"""Load on `dreamlab serve`: C concurrent clients submit N jobs in all to a real server process on
127.0.0.1 and wait for them; checks that every job completes exactly once, and reports throughput and
latency.

    python benchmarks/serve_load.py [--jobs 100] [--clients 20] [--steps 8] [--model DIR] [--threads 1]
        [--follow events|poll] [--poll-interval 0.1] [--preview-every 2] [--json out.json]

The server is `python -m dreamlab.cli serve` with a fresh data folder (a tiny random model made in a
temp folder unless --model is given). Each client thread submits its share of the jobs one after the
other, following each to its end (by default through its Server-Sent Events stream; --follow poll polls
GET /api/jobs/{id} instead) before submitting the next, so up to C jobs are in the queue at once.
Latency = client-observed time from submission to the job's end (queue wait included; the stream checks
for news every 50 ms); the server's own view (finished - created) is reported beside it.
Throughput = jobs / wall time from the first submission to the last completion.

Checks: every submission got a distinct job id; every job ends ``done`` with ``batch`` images; the
gallery holds exactly jobs x batch images, each job's once; one PNG per image on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def start_server(model: Path, data: Path, port: int, threads: int, preview_every: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dreamlab.cli", "serve", "--model", str(model), "--data", str(data), "--host", "127.0.0.1",
         "--port", str(port), "--threads", str(threads), "--preview-every", str(preview_every), "--log-level", "warning",
         "--max-queue", "1000"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
    )
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited:\n{log.read_text()}")
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("server did not start in 120 s")
            try:
                if c.get("/api/health").status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--model", help="model folder (default: a tiny random model made in a temp folder)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--preview-every", type=int, default=2, help="the server's preview interval in steps (0: none)")
    ap.add_argument("--follow", choices=["events", "poll"], default="events",
                    help="how clients wait for a job: its Server-Sent Events stream, or polling GET /api/jobs/{id}")
    ap.add_argument("--poll-interval", type=float, default=0.1, help="seconds between polls with --follow poll")
    ap.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dreamlab-load-"))
    if args.model:
        model = Path(args.model)
    else:
        from dreamlab.models.tiny import make_tiny_model

        model = make_tiny_model(work / "tiny")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(model, work / "data", port, args.threads, args.preview_every, work / "server.log")
    print(f"server up on {url} (data in {work / 'data'})", flush=True)

    shares = [args.jobs // args.clients + (i < args.jobs % args.clients) for i in range(args.clients)]
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.timeout
    start = threading.Barrier(args.clients)

    def client(index: int, count: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            start.wait()
            for k in range(count):
                body = {"prompt": f"client {index} job {k} red apple", "steps": args.steps, "seed": index * 1000 + k,
                        "batch": args.batch}
                t0 = time.monotonic()
                r = c.post("/api/jobs", json=body)
                if r.status_code != 202:
                    with lock:
                        errors.append(f"submit: {r.status_code} {r.text}")
                    continue
                job_id = r.json()["id"]
                job = follow(c, job_id) if args.follow == "events" else poll(c, job_id)
                latency = time.monotonic() - t0
                with lock:
                    results.append({"id": job_id, "state": job["state"], "latency": latency, "images": len(job["images"]),
                                    "server_latency": (job["finished"] or 0) - job["created"], "error": job["error"],
                                    "done_at": time.monotonic()})

    def follow(c: httpx.Client, job_id: str) -> dict:
        """Read the job's Server-Sent Events up to its ``end`` event."""
        with c.stream("GET", f"/api/jobs/{job_id}/events", timeout=args.timeout) as stream:
            event = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "end":
                    return json.loads(line[6:])
        return c.get(f"/api/jobs/{job_id}").json()

    def poll(c: httpx.Client, job_id: str) -> dict:
        while time.monotonic() < deadline:
            job = c.get(f"/api/jobs/{job_id}").json()
            if job["state"] not in ("queued", "running"):
                return job
            time.sleep(args.poll_interval)
        return job

    threads = [threading.Thread(target=client, args=(i, n)) for i, n in enumerate(shares)]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max((r["done_at"] for r in results), default=time.monotonic()) - t_start

    with httpx.Client(base_url=url, timeout=30) as c:
        gallery = []
        while len(gallery) < 10 * args.jobs * args.batch:
            page = c.get("/api/gallery", params={"limit": 200, "offset": len(gallery)}).json()
            gallery += page["items"]
            if len(gallery) >= page["total"]:
                break
    proc.terminate()
    proc.wait(30)

    ids = [r["id"] for r in results]
    done = [r for r in results if r["state"] == "done"]
    image_jobs = sorted(im["job_id"] for im in gallery)
    pngs = list((work / "data" / "images").glob("*.png"))
    checks = {
        "all submitted": len(results) == args.jobs and not errors,
        "ids distinct": len(set(ids)) == len(ids),
        "all done": len(done) == args.jobs,
        "images per job": all(r["images"] == args.batch for r in results),
        "gallery exact": image_jobs == sorted(i for i in ids for _ in range(args.batch)),
        "pngs on disk": len(pngs) == args.jobs * args.batch,
    }
    lat = [r["latency"] for r in done] or [0.0]
    server_lat = [r["server_latency"] for r in done] or [0.0]
    out = {
        "jobs": args.jobs, "clients": args.clients, "steps": args.steps, "batch": args.batch, "threads": args.threads,
        "follow": args.follow, "preview_every": args.preview_every,
        "model": str(model), "wall_s": round(wall, 3), "throughput_jobs_per_s": round(len(done) / wall, 2),
        "latency_s": {"p50": round(percentile(lat, 50), 3), "p95": round(percentile(lat, 95), 3),
                      "mean": round(statistics.mean(lat), 3), "max": round(max(lat), 3)},
        "server_latency_s": {"p50": round(percentile(server_lat, 50), 3), "p95": round(percentile(server_lat, 95), 3)},
        "checks": checks, "errors": errors[:5] + [r["error"] for r in results if r["error"]][:5],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    print(json.dumps(out, indent=2))
    print(f"{len(done)}/{args.jobs} jobs done by {args.clients} clients in {wall:.2f} s: {out['throughput_jobs_per_s']} jobs/s, "
          f"latency p50 {out['latency_s']['p50']:.3f} s, p95 {out['latency_s']['p95']:.3f} s; "
          + ("all checks passed" if all(checks.values()) else "FAILED: " + ", ".join(k for k, v in checks.items() if not v)))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
