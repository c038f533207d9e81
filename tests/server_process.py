"""`dreamlab serve` as a real process on a free loopback port, for the tests that need one (the SIGKILL
test, the A1111 client test, the Redis queue's), and `dreamlab worker` processes."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path, data: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(data.parent / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dreamlab.cli", "serve", "--model", str(model), "--data", str(data),
             "--port", str(self.port), "--threads", "1", "--log-level", "warning", "--no-ui", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=ENV,
        )
        self.client = httpx.Client(base_url=self.url, timeout=10)
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, f"server exited: {Path(self.log.name).read_text()}"
            assert time.monotonic() < deadline, "server did not start in 90 s"
            try:
                if self.client.get("/api/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def stop(self, sig=signal.SIGTERM) -> None:
        stop(self.proc, sig)
        self.client.close()
        self.log.close()


class WorkerProcess:
    """`dreamlab worker` as a real process, for the Redis queue's tests; ``wait_ready`` waits for its banner."""

    def __init__(self, model: Path, queue_url: str, folder: Path, *extra: str):
        self.log_path = folder / f"worker-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dreamlab.cli", "worker", "--queue", queue_url, "--model", str(model),
             "--threads", "1", "--log-level", "warning", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=ENV,
        )

    def wait_ready(self, timeout: float = 90) -> "WorkerProcess":
        deadline = time.monotonic() + timeout
        while "dreamlab worker " not in self.log_path.read_text():
            assert self.proc.poll() is None, f"worker exited: {self.log_path.read_text()}"
            assert time.monotonic() < deadline, f"worker did not start in {timeout} s"
            time.sleep(0.1)
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        stop(self.proc, sig)
        self.log.close()


def stop(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` and wait for the process (SIGKILL after 30 s)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
