"""Load on `dreamlab serve`: C concurrent clients submit N jobs in all to a real server process on
127.0.0.1 and wait for them; checks that every job completes exactly once, and reports throughput and
latency.

    python benchmarks/serve_load.py [--jobs 100] [--clients 20] [--steps 8] [--model DIR] [--threads 1]
        [--follow events|poll] [--poll-interval 0.1] [--preview-every 2] [--json out.json]
        [--queue sqlite|redis|redis://HOST:PORT/DB] [--workers N]

The server is `python -m dreamlab.cli serve` with a fresh data folder (a tiny random model made in a
temp folder unless --model is given). With --queue redis it starts its own redis-server (Debian's, on a
free loopback port, append-only, fsync every second) and with redis://... uses that one (flushing its
database first); the server is then the API node only (`serve --queue URL --no-worker`) and --workers N
`dreamlab worker --queue URL` processes run the jobs. With sqlite (the default) the server's own worker
does, and --workers must be 1. Each client thread submits its share of the jobs one after the
other, following each to its end (by default through its Server-Sent Events stream; --follow poll polls
GET /api/jobs/{id} instead) before submitting the next, so up to C jobs are in the queue at once.
Latency = client-observed time from submission to the job's end (queue wait included; the stream checks
for news every 50 ms); the server's own view (finished - created) is reported beside it.
Throughput = jobs / wall time from the first submission to the last completion.

Checks: every submission got a distinct job id; every job ends ``done`` with ``batch`` images, run once
(``attempts`` 1); the gallery holds exactly jobs x batch images, each job's once; one PNG per image on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux's /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    """A private redis-server on a free loopback port: append-only, fsync every second (docs/serving.md)."""
    import redis

    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "",
                             "--appendonly", "yes", "--appendfsync", "everysec", "--logfile", str(folder / "redis.log")])
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"redis-server did not start:\n{(folder / 'redis.log').read_text()}") from None
            time.sleep(0.05)


def start_workers(n: int, model: Path, queue: str, threads: int, preview_every: int, folder: Path) -> list[subprocess.Popen]:
    """``n`` ``dreamlab worker`` processes; returns once each has said it runs jobs."""
    procs, logs = [], [folder / f"worker-{i}.log" for i in range(n)]
    for log in logs:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dreamlab.cli", "worker", "--queue", queue, "--model", str(model), "--threads", str(threads),
             "--preview-every", str(preview_every), "--log-level", "warning"],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ENV,
        ))
    deadline = time.monotonic() + 120
    for proc, log in zip(procs, logs):
        while "dreamlab worker " not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker did not start:\n{log.read_text()}")
            time.sleep(0.1)
    return procs


def start_server(model: Path, data: Path, port: int, threads: int, preview_every: int, log: Path,
                 queue: str | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dreamlab.cli", "serve", "--model", str(model), "--data", str(data), "--host", "127.0.0.1",
         "--port", str(port), "--threads", str(threads), "--preview-every", str(preview_every), "--log-level", "warning",
         "--max-queue", "1000", *(["--queue", queue, "--no-worker"] if queue else [])],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ENV,
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
    ap.add_argument("--queue", default="sqlite",
                    help="sqlite (the server's embedded queue), redis (a redis-server started here) or redis://HOST:PORT/DB")
    ap.add_argument("--workers", type=int, default=1, help="`dreamlab worker` processes (Redis queue only)")
    args = ap.parse_args()
    if args.queue == "sqlite" and args.workers != 1:
        ap.error("--workers: the SQLite queue has the server's one worker; use --queue redis for more")

    work = Path(tempfile.mkdtemp(prefix="dreamlab-load-"))
    if args.model:
        model = Path(args.model)
    else:
        from dreamlab.models.tiny import make_tiny_model

        model = make_tiny_model(work / "tiny")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra: list[subprocess.Popen] = []  # redis-server and the workers, stopped at the end
    queue = None
    if args.queue == "redis":
        redis_proc, queue = start_redis(work)
        extra.append(redis_proc)
    elif args.queue != "sqlite":
        import redis

        queue = args.queue
        redis.Redis.from_url(queue).flushdb()
    redis_procs = list(extra)  # (none when the server is someone else's)
    proc = start_server(model, work / "data", port, args.threads, args.preview_every, work / "server.log", queue)
    workers = start_workers(args.workers, model, queue, args.threads, args.preview_every, work) if queue else []
    extra[:0] = workers
    print(f"server up on {url} (data in {work / 'data'}; queue {queue or 'sqlite'}, {args.workers} worker(s))", flush=True)

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
                                    "attempts": job["attempts"],
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
    # CPU time of each kind of process during the load: the API node's per job bounds what more workers on
    # other machines can add (the worker's own in the SQLite case)
    roles = {"server": [proc], "workers": workers, "redis": redis_procs}
    cpu_start = {role: sum(cpu_seconds(p.pid) for p in ps) for role, ps in roles.items()}
    t_start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max((r["done_at"] for r in results), default=time.monotonic()) - t_start
    cpu = {role: sum(cpu_seconds(p.pid) for p in ps) - cpu_start[role] for role, ps in roles.items() if ps}

    with httpx.Client(base_url=url, timeout=30) as c:
        gallery = []
        while len(gallery) < 10 * args.jobs * args.batch:
            page = c.get("/api/gallery", params={"limit": 200, "offset": len(gallery)}).json()
            gallery += page["items"]
            if len(gallery) >= page["total"]:
                break
    for p in (proc, *extra):
        p.terminate()
        p.wait(30)

    ids = [r["id"] for r in results]
    done = [r for r in results if r["state"] == "done"]
    image_jobs = sorted(im["job_id"] for im in gallery)
    pngs = list((work / "data" / "images").glob("*.png"))
    checks = {
        "all submitted": len(results) == args.jobs and not errors,
        "ids distinct": len(set(ids)) == len(ids),
        "all done": len(done) == args.jobs,
        "images per job": all(r["images"] == args.batch for r in results),
        "each run once": all(r["attempts"] == 1 for r in results),
        "gallery exact": image_jobs == sorted(i for i in ids for _ in range(args.batch)),
        "pngs on disk": len(pngs) == args.jobs * args.batch,
    }
    lat = [r["latency"] for r in done] or [0.0]
    server_lat = [r["server_latency"] for r in done] or [0.0]
    out = {
        "jobs": args.jobs, "clients": args.clients, "steps": args.steps, "batch": args.batch, "threads": args.threads,
        "follow": args.follow, "preview_every": args.preview_every, "queue": "redis" if queue else "sqlite",
        "workers": args.workers,
        "model": str(model), "wall_s": round(wall, 3), "throughput_jobs_per_s": round(len(done) / wall, 2),
        "latency_s": {"p50": round(percentile(lat, 50), 3), "p95": round(percentile(lat, 95), 3),
                      "mean": round(statistics.mean(lat), 3), "max": round(max(lat), 3)},
        "server_latency_s": {"p50": round(percentile(server_lat, 50), 3), "p95": round(percentile(server_lat, 95), 3)},
        "cpu_ms_per_job": {role: round(1000 * seconds / max(len(done), 1), 1) for role, seconds in cpu.items()},
        "checks": checks, "errors": errors[:5] + [r["error"] for r in results if r["error"]][:5],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    print(json.dumps(out, indent=2))
    print(f"{len(done)}/{args.jobs} jobs done by {args.clients} clients in {wall:.2f} s ({out['queue']} queue, "
          f"{args.workers} worker(s)): {out['throughput_jobs_per_s']} jobs/s, "
          f"latency p50 {out['latency_s']['p50']:.3f} s, p95 {out['latency_s']['p95']:.3f} s; "
          + ("all checks passed" if all(checks.values()) else "FAILED: " + ", ".join(k for k, v in checks.items() if not v)))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
