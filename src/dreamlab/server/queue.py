"""The job store: jobs and their images in one SQLite database (WAL mode), so queued and running jobs
survive a restart.

States: ``queued -> running -> done | failed | cancelled``; a queued job can also go straight to
``cancelled``. A job that was ``running`` when the process died is put back in the queue on the next
start (``requeue_interrupted``) and runs again from the beginning; after ``max_attempts`` starts it fails
instead, so one job that kills the process cannot loop forever.

One connection, guarded by a lock, serves every thread: the API's threads and the worker. Every state
change is one transaction, so a job is claimed by exactly one worker, and a finished job's images are
recorded together with its state (a crash between writing the PNGs and the commit leaves the job
``running``; it runs again and overwrites the same files, so nothing is duplicated).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from ..manifest import Manifest

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"done", "failed", "cancelled"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,    -- submission order: the queue is FIFO
    id TEXT UNIQUE NOT NULL,                  -- uuid4 hex, made by the server
    state TEXT NOT NULL,
    request TEXT NOT NULL,                    -- GenerationRequest as JSON (seed always set)
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
"""
_INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,                      -- '<job id>-<index in batch>'
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    filename TEXT NOT NULL,                   -- made by the server; relative to the images folder
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    created REAL NOT NULL,
    manifest TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_job ON images(job_id);
CREATE INDEX IF NOT EXISTS images_created ON images(created);
CREATE TABLE IF NOT EXISTS inputs (
    sha256 TEXT PRIMARY KEY,                  -- the hash the manifests record ("sha256:<hex>")
    filename TEXT NOT NULL,
    created REAL NOT NULL
);
"""


class QueueFullError(Exception):
    def __init__(self, pending: int):
        super().__init__(f"the queue is full ({pending} jobs waiting or running); try again later")


class QueueUnavailableError(Exception):
    """The shared queue (a Redis server) cannot be reached now; the request can be retried."""


@dataclass
class Job:
    id: str
    state: str
    request: dict[str, Any]
    created: float
    started: float | None
    finished: float | None
    attempts: int
    cancel_requested: bool
    error: str | None
    seq: int = 0


@dataclass
class ImageRecord:
    id: str
    job_id: str
    idx: int
    filename: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    created: float
    manifest: dict[str, Any] = field(repr=False)  # as stored (JSON); ``record`` is the typed form

    @property
    def record(self) -> Manifest:
        return Manifest.load(self.manifest)


@dataclass
class Progress:
    """Live progress of the running job; kept in memory only (it restarts with the job)."""

    step: int = 0
    total: int = 0
    preview: bytes | None = None  # small PNG of the current x0 estimate
    version: int = 0  # bumped on every change, so streams send only news


def new_id() -> str:
    return uuid.uuid4().hex


class GalleryIndex:
    """The gallery's index in the server's SQLite database: its images (with their manifests) and the
    recorded inputs. Both job stores keep it: ``JobStore`` (jobs in the same database) and the Redis one
    (``redis_store.RedisJobStore``: jobs in Redis, shared by workers on other machines)."""

    def __init__(self, path: str | Path, schema: str = ""):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(schema + _INDEX_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @staticmethod
    def _insert_images(db: sqlite3.Connection, images: list[ImageRecord]) -> None:
        """Inside a transaction: the images of a finished job (a rerun job replaces its own rows)."""
        db.executemany(
            "INSERT OR REPLACE INTO images (id, job_id, idx, filename, prompt, negative_prompt, seed, width, height, created, manifest)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (im.id, im.job_id, im.idx, im.filename, im.prompt, im.negative_prompt, im.seed, im.width, im.height,
                 im.created, json.dumps(im.manifest, sort_keys=True))
                for im in images
            ],
        )

    # --- images -----------------------------------------------------------------------------------

    def images_of(self, job_id: str) -> list[ImageRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM images WHERE job_id = ? ORDER BY idx", (job_id,)).fetchall()
        return [_image(r) for r in rows]

    def image(self, image_id: str) -> ImageRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        return _image(row) if row else None

    def search_images(self, query: str = "", limit: int = 50, offset: int = 0) -> tuple[int, list[ImageRecord]]:
        """Newest first; ``query`` matches a substring of the prompt (case-insensitive for ASCII)."""
        like = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where = "WHERE prompt LIKE ? ESCAPE '\\'"
        with self._lock:
            (total,) = self._db.execute(f"SELECT COUNT(*) FROM images {where}", (like,)).fetchone()
            rows = self._db.execute(
                f"SELECT * FROM images {where} ORDER BY created DESC, id LIMIT ? OFFSET ?", (like, limit, offset)
            ).fetchall()
        return int(total), [_image(r) for r in rows]

    def delete_image(self, image_id: str) -> ImageRecord | None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM images WHERE id = ?", (image_id,))
        return _image(row)

    def all_image_filenames(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT filename FROM images").fetchall()]

    # --- recorded inputs (img2img sources, masks) ---------------------------------------------------

    def add_input(self, sha256: str, filename: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO inputs (sha256, filename, created) VALUES (?, ?, ?)", (sha256, filename, time.time()))

    def input_filename(self, sha256: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT filename FROM inputs WHERE sha256 = ?", (sha256,)).fetchone()
        return row["filename"] if row else None


class JobStore(GalleryIndex):
    """The embedded job store: jobs and the gallery index in one SQLite database, one worker thread."""

    def __init__(self, path: str | Path, *, max_queue: int = 256, max_attempts: int = 3):
        super().__init__(path, _SCHEMA)
        self.max_queue = max_queue
        self.max_attempts = max_attempts
        self._progress: dict[str, Progress] = {}
        self._cancel: set[str] = set()
        self._wakeup = threading.Condition(self._lock)
        self.version = 0  # bumped on every job state change

    # --- jobs -------------------------------------------------------------------------------------

    def submit(self, request: dict[str, Any]) -> Job:
        job_id, now = new_id(), time.time()
        with self._tx() as db:
            (pending,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()
            if pending >= self.max_queue:
                raise QueueFullError(pending)
            db.execute(
                "INSERT INTO jobs (id, state, request, created) VALUES (?, 'queued', ?, ?)",
                (job_id, json.dumps(request), now),
            )
        self.notify()
        job = self.get(job_id)
        assert job is not None
        return job

    def claim(self) -> Job | None:
        """Atomically move the oldest queued job to ``running`` and return it (None if none is queued)."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1 WHERE id = ?",
                (time.time(), row["id"]),
            )
            self._progress[row["id"]] = Progress()
        self.notify()
        return self.get(row["id"])

    def wait_for_work(self, timeout: float) -> None:
        with self._wakeup:
            if not self._has_queued():
                self._wakeup.wait(timeout)

    def _has_queued(self) -> bool:
        return self._db.execute("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1").fetchone() is not None

    def requeue_interrupted(self) -> list[str]:
        """On startup: jobs left ``running`` by a dead process go back to the queue (or fail / are cancelled)."""
        now = time.time()
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts, cancel_requested FROM jobs WHERE state = 'running'").fetchall()
            requeued = []
            for r in rows:
                if r["cancel_requested"]:
                    db.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ?", (now, r["id"]))
                elif r["attempts"] >= self.max_attempts:
                    msg = f"gave up after {r['attempts']} attempts: the server stopped while running this job each time"
                    db.execute("UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ?", (now, msg, r["id"]))
                else:
                    db.execute("UPDATE jobs SET state = 'queued', started = NULL WHERE id = ?", (r["id"],))
                    requeued.append(r["id"])
        self.notify()
        return requeued

    def complete(self, job_id: str, images: list[ImageRecord]) -> None:
        with self._tx() as db:
            self._insert_images(db, images)
            db.execute("UPDATE jobs SET state = 'done', finished = ?, error = NULL WHERE id = ?", (time.time(), job_id))
        self._finish(job_id)

    def fail(self, job_id: str, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ?", (time.time(), error, job_id))
        self._finish(job_id)

    def mark_cancelled(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ?", (time.time(), job_id))
        self._finish(job_id)

    def release(self, job_id: str) -> None:
        """Put a running job back at its place in the queue, as if it had not started (server stopping)."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = 'queued', started = NULL, attempts = MAX(attempts - 1, 0) WHERE id = ? AND state = 'running'",
                (job_id,),
            )
        self._finish(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """A queued job is cancelled at once; a running one at its next step (the worker checks)."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["state"] == "queued":
                db.execute(
                    "UPDATE jobs SET state = 'cancelled', finished = ?, cancel_requested = 1 WHERE id = ?", (time.time(), job_id)
                )
            elif row["state"] == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                self._cancel.add(job_id)
        self.notify()
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return job_id in self._cancel

    def _finish(self, job_id: str) -> None:
        with self._lock:
            self._cancel.discard(job_id)
            self._progress.pop(job_id, None)
        self.notify()

    def notify(self) -> None:
        """Wake the worker and mark a state change (streams re-read only after one)."""
        with self._wakeup:
            self.version += 1
            self._wakeup.notify_all()

    def get(self, job_id: str, *, with_request: bool = True) -> Job | None:
        """``with_request=False`` skips the request (it can hold megabytes of base64 images)."""
        with self._lock:
            row = self._db.execute(f"SELECT {_columns(with_request)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def running(self) -> Job | None:
        """The running job (the oldest, should there be more), without its request."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_columns(False)} FROM jobs WHERE state = 'running' ORDER BY seq LIMIT 1").fetchone()
        return _job(row) if row else None

    def position(self, job: Job) -> int | None:
        """How many queued jobs are ahead of this one (None unless queued)."""
        if job.state != "queued":
            return None
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < ?", (job.seq,)).fetchone()
        return int(n)

    def list_jobs(self, state: str | None = None, limit: int = 50, offset: int = 0) -> list[Job]:
        sql, args = "SELECT * FROM jobs", []
        if state:
            sql, args = sql + " WHERE state = ?", [state]
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY seq DESC LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {r["state"]: r["n"] for r in rows}

    # --- progress (memory) ------------------------------------------------------------------------

    def set_progress(self, job_id: str, step: int, total: int, preview: bytes | None = None) -> None:
        with self._lock:
            p = self._progress.setdefault(job_id, Progress())
            p.step, p.total = step, total
            if preview is not None:
                p.preview = preview
            p.version += 1

    def progress(self, job_id: str) -> Progress | None:
        with self._lock:
            p = self._progress.get(job_id)
            return Progress(p.step, p.total, p.preview, p.version) if p else None

_JOB_COLUMNS = ("seq", "id", "state", "request", "created", "started", "finished", "attempts", "cancel_requested", "error")


def _columns(with_request: bool) -> str:
    return "*" if with_request else ", ".join(c for c in _JOB_COLUMNS if c != "request")


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        state=row["state"],
        request=json.loads(row["request"]) if "request" in row.keys() else {},
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        attempts=row["attempts"],
        cancel_requested=bool(row["cancel_requested"]),
        error=row["error"],
        seq=row["seq"],
    )


def _image(row: sqlite3.Row) -> ImageRecord:
    return ImageRecord(
        id=row["id"],
        job_id=row["job_id"],
        idx=row["idx"],
        filename=row["filename"],
        prompt=row["prompt"],
        negative_prompt=row["negative_prompt"],
        seed=row["seed"],
        width=row["width"],
        height=row["height"],
        created=row["created"],
        manifest=json.loads(row["manifest"]),
    )
