"""A thin client of a running ``dreamlab serve``: ``dreamlab generate --server URL ...`` (docs/benchmarks.md,
Start-up).

A cold ``dreamlab generate`` spends about 5 s importing torch, diffusers and transformers before it reads a
weight; a server that has loaded its model is warm. This client uses the standard library only (no torch,
no numpy, no pydantic): it sends the request's fields as JSON to ``POST /api/jobs`` (the server validates
them and answers a bad one with a one-line 422), polls the job and writes each PNG as the server made it,
with its parameters chunk and manifest, so ``dreamlab replay`` works on it as on a local image.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .errors import DreamlabError

TERMINAL = ("done", "failed", "cancelled")


def file_b64(path: str | Path, what: str) -> str:
    """A file's bytes as base64 (the server decodes and checks the image)."""
    try:
        return base64.b64encode(Path(path).expanduser().read_bytes()).decode("ascii")
    except OSError as e:
        raise DreamlabError(f"{what} {path}: {e.strerror or e}") from None


def _call(url: str, method: str = "GET", body: dict | None = None, timeout: float = 30.0) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read().decode()).get("detail") or e.reason
        except ValueError:
            detail = e.reason
        raise DreamlabError(f"the server refused the request ({e.code}): {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DreamlabError(f"cannot reach the dreamlab server at {url.split('/api/')[0]}: {reason} "
                            "(start one with `dreamlab serve`)") from None


def generate_remote(server: str, fields: dict[str, Any], outputs: list[Path], *, timeout: float = 3600.0,
                    poll: float = 0.05, on_progress=None) -> list[tuple[Path, int]]:
    """Run ``fields`` (GenerationRequest fields) on the server at ``server``; (path, seed) of each image
    written to ``outputs`` (one per image of the batch)."""
    base = server.rstrip("/")
    job = json.loads(_call(f"{base}/api/jobs", "POST", fields))
    deadline = time.monotonic() + timeout
    while job["state"] not in TERMINAL:
        if time.monotonic() > deadline:
            raise DreamlabError(f"job {job['id']} did not finish in {timeout:g} s (it goes on on the server)")
        time.sleep(poll)
        job = json.loads(_call(f"{base}/api/jobs/{job['id']}"))
        if on_progress is not None:
            on_progress(job)
    if job["state"] != "done":
        raise DreamlabError(f"job {job['id']} {job['state']}: {job.get('error') or 'no image'}")
    written = []
    for image, path in zip(job["images"], outputs):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_call(f"{base}{image['url']}"))
        written.append((path, int(image["seed"])))
    return written
