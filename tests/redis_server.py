"""A real redis-server (Debian's package) on a free loopback port, in a temp folder, for the tests of the
Redis queue. Append-only persistence with an fsync per write, so a SIGKILLed server restarts with every
acknowledged write (what the "Redis restarted mid-queue" test relies on)."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from server_process import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def require_redis_server() -> None:
    """Skip without redis-server, except where CI asks for it (DREAMLAB_REQUIRE_REDIS=1): there, fail."""
    if Path(REDIS_SERVER).is_file():
        return
    message = f"{REDIS_SERVER} is not installed (Debian: apt-get install redis-server)"
    if os.environ.get("DREAMLAB_REQUIRE_REDIS") == "1":
        pytest.fail(message + "; DREAMLAB_REQUIRE_REDIS=1 (.ci/run installs it)")
    pytest.skip(message)


class RedisServer:
    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, (self.folder / "redis.log").read_text()
            try:
                if client.ping():
                    break
            except redis.RedisError:
                assert time.monotonic() < deadline, "redis-server did not start in 20 s"
                time.sleep(0.05)
        client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)

    def restart(self, sig: int = signal.SIGKILL, down: float = 0.0) -> None:
        self.stop(sig)
        time.sleep(down)
        self.start()
