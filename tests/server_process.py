"""`dreamlab serve` as a real process on a free loopback port, for the tests that need one (the SIGKILL
test, the A1111 client test)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path, data: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.log = open(data.parent / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dreamlab.cli", "serve", "--model", str(model), "--data", str(data),
             "--port", str(self.port), "--threads", "1", "--log-level", "warning", "--no-ui", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
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
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.client.close()
        self.log.close()
