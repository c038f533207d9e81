"""The API node's job store for a Redis queue (``dreamlab serve --queue redis://...``): the same operations
the service calls on the embedded ``JobStore``, with the jobs in Redis (``redis_queue.RedisQueue``) and the
gallery index (images, inputs) in this node's SQLite database, as in the embedded server.

One thread (``_sync``) ties the two together:

- it **collects** the images workers hand in: it moves the job's id from ``results`` to ``collecting``,
  writes the PNGs into the gallery under server-made names, records them, and only then marks the job
  ``done``; a crash in between leaves the id in ``collecting``, and the next start collects it again (the
  same files, the same rows: nothing is doubled);
- it **mirrors**, every ``POLL`` seconds, the queue's state-change counter and the running jobs' progress
  (step, total, preview), so the followers of jobs (``Service.follow``: the SSE route, the UI) read memory as
  they do with the embedded store, and cost Redis nothing however many there are;
- it holds this node's **claim** on the queue: one API node per queue, the one whose gallery gets the images.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import redis

from ..errors import DreamlabError
from ..manifest import Manifest
from ..metadata import weights_sha256
from ..models.bundle import ModelBundle
from .gallery import Gallery
from .queue import GalleryIndex, Job, Progress, QueueUnavailableError
from .redis_queue import RedisQueue, shown

log = logging.getLogger("dreamlab.server")

POLL = 0.05  # seconds between mirrors of progress (and the longest wait for a handed-in result)
CLAIM_TTL_MS = 15000  # the API node's claim lapses this long after the node stops refreshing it


class RedisJobStore(GalleryIndex):
    def __init__(self, data_dir: Path, db_name: str, queue: RedisQueue, model: ModelBundle, *, max_queue: int = 256):
        super().__init__(data_dir / db_name)
        self.queue, self.max_queue = queue, max_queue
        self.gallery = Gallery(data_dir, self)
        self.identity = f"{socket.gethostname()}:{data_dir.resolve()}"
        self.version = 0  # the queue's state-change counter, as last mirrored
        self._progress: dict[str, tuple[int, Progress]] = {}  # running job -> (preview version, progress)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._redis = queue.fast  # the thread's calls fail fast; it backs off and tries again
        r, claim = queue.redis, queue.key("api")  # this node's claim; the same node restarted takes it back
        if not r.set(claim, self.identity, nx=True, px=CLAIM_TTL_MS) and (other := r.get(claim)) != self.identity.encode():
            super().close()
            raise DreamlabError(f"another dreamlab API node ({other.decode() if other else '?'}) uses the queue at "
                                f"{shown(queue.url)}: one API node per queue (its gallery gets the images)")
        r.set(queue.key("model"), weights_sha256(model.files) or "")  # what workers check theirs against

    # --- lifecycle ---

    def requeue_interrupted(self) -> list[str]:
        """On startup: results whose collection a crash cut short go back to be collected; then this node
        collects and mirrors in a thread until ``close``. The ids put back."""
        requeued = self._requeue_collecting()
        self._mirror()
        self._thread = threading.Thread(target=self._sync, name="dreamlab-redis-sync", daemon=True)
        self._thread.start()
        return requeued

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        try:
            if self.queue.redis.get(self.queue.key("api")) == self.identity.encode():
                self.queue.redis.delete(self.queue.key("api"))
        except redis.RedisError:
            pass
        self.queue.close()
        super().close()

    def _requeue_collecting(self) -> list[str]:
        ids = []
        while (job_id := self.queue.redis.lmove(self.queue.key("collecting"), self.queue.key("results"), "RIGHT", "LEFT")):
            ids.append(job_id.decode())
        return ids

    def _sync(self) -> None:
        failed = False
        last_claim = 0.0
        while not self._stop.is_set():
            try:
                if failed:  # a collection cut short by an error goes back to be collected again
                    self._requeue_collecting()
                    failed = False
                if time.monotonic() - last_claim > 1.0:
                    self._redis.set(self.queue.key("api"), self.identity, px=CLAIM_TTL_MS)
                    last_claim = time.monotonic()
                job_id = self._redis.blmove(self.queue.key("results"), self.queue.key("collecting"), POLL, "LEFT", "RIGHT")
                if job_id is not None:
                    self._collect(job_id.decode())
                self._mirror()
            except (redis.RedisError, QueueUnavailableError) as e:
                if not failed:
                    log.warning("the job queue's Redis server: %s; retrying", e)
                failed = True
                self._stop.wait(0.5)
            except Exception:  # a bug: keep the node serving, and say it
                log.exception("collecting from the job queue")
                failed = True
                self._stop.wait(1.0)

    # --- the thread's two jobs ---

    def _collect(self, job_id: str) -> None:
        result = self._redis.hgetall(self.queue.key("result", job_id))
        error = None
        if result:  # (empty: collected already, before a crash cut the clean-up short)
            n = int(result[b"n"])
            pngs = [result[f"png:{i}".encode()] for i in range(n)]
            manifests = [Manifest.load(json.loads(result[f"manifest:{i}".encode()])) for i in range(n)]
            try:
                records = self.gallery.save_files(job_id, pngs, manifests)
                with self._tx() as db:
                    self._insert_images(db, records)
            except DreamlabError as e:  # e.g. the disk is full: the job fails with that, as in the embedded server
                error = str(e)
        self.queue.collected(job_id, error, self._redis)

    def _mirror(self) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self.queue.key("version"))
        pipe.zrange(self.queue.key("q", "running"), 0, -1)
        version, running = pipe.execute()
        ids = [i.decode() for i in running]
        for job_id in ids:
            pipe.hmget(self.queue.key("progress", job_id), ("step", "total", "version", "pv"))
        rows = pipe.execute() if ids else []
        mirrored: dict[str, tuple[int, Progress]] = {}
        stale = []
        for job_id, (step, total, pversion, pv) in zip(ids, rows):
            if pversion is None:
                continue  # no step yet
            pv = int(pv or 0)
            seen = self._progress.get(job_id)
            preview = seen[1].preview if seen and seen[0] == pv else None  # the same bytes object while unchanged
            mirrored[job_id] = (pv, Progress(int(step), int(total), preview, int(pversion)))
            if pv and preview is None:
                stale.append(job_id)
        for job_id in stale:
            pipe.hget(self.queue.key("progress", job_id), "preview")
        for job_id, preview in zip(stale, pipe.execute() if stale else []):
            pv, p = mirrored[job_id]
            mirrored[job_id] = (pv, Progress(p.step, p.total, preview, p.version))
        self._progress = mirrored
        self.version = int(version or 0)

    # --- what the service calls ---

    def submit(self, request: dict[str, Any]) -> Job:
        job = self.queue.get(self.queue.submit(request, self.max_queue))
        assert job is not None
        return job

    def cancel(self, job_id: str) -> Job | None:
        """A queued job is cancelled at once; a running one at its next step (its worker, wherever it is,
        reads the flag every step)."""
        if self.queue.cancel(job_id) is None:
            return None
        return self.queue.get(job_id)

    def get(self, job_id: str, *, with_request: bool = True) -> Job | None:
        return self.queue.get(job_id, with_request=with_request)

    def running(self) -> Job | None:
        """The oldest running job (there is one per busy worker), without its request."""
        ids = self.queue.running_ids()
        return self.queue.get(ids[0], with_request=False) if ids else None

    def position(self, job: Job) -> int | None:
        return self.queue.position(job.id) if job.state == "queued" else None

    def list_jobs(self, state: str | None = None, limit: int = 50, offset: int = 0) -> list[Job]:
        return self.queue.list_jobs(state, limit, offset)

    def counts(self) -> dict[str, int]:
        return self.queue.counts()

    def progress(self, job_id: str) -> Progress | None:
        seen = self._progress.get(job_id)
        return seen[1] if seen else None
