"""The service both faces of the server call: the HTTP API (``app.py``) and the Gradio UI (``ui.py``).

Everything the two faces must agree on lives here, once: this server's limits and request checks, the
data-folder lock, submitting (seed fixed, input images kept), cancelling (and the rule that a finished
job cannot be), how a job is shown (progress, queue position, images), the gallery, and following a job
as it runs (``Service.follow``, the one loop both the SSE route and the UI's Generate handler consume).

It knows neither FastAPI nor Gradio: it returns plain records (``Job``, ``JobView``, ``ImageRecord``) and
raises plain exceptions; each face turns them into its own responses. So ``ui.py`` and ``app.py`` import
this module and not each other (``create_app`` mounts the UI lazily, so ``--no-ui`` never imports Gradio).
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import io
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

from PIL import Image

from ..errors import DreamlabError, InvalidRequestError
from ..generate import GenerationRequest, image_bytes, open_image, recorded, resolve
from ..request import image_fields
from ..generate import check_request as check_for_model
from ..models.bundle import ModelBundle
from .gallery import Gallery
from .queue import TERMINAL, ImageRecord, Job, JobStore, Progress
from .worker import Worker

if TYPE_CHECKING:
    from .redis_queue import RedisQueue
    from .redis_store import RedisJobStore

log = logging.getLogger("dreamlab.server")

DB_NAME = "dreamlab.sqlite3"
MAX_FOLLOW_SECONDS = 6 * 3600  # a follower gives up after this (the job goes on)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server (tighter than the engine's own bounds)."""

    max_steps: int = 150
    max_side: int = 1024  # pixels, width and height
    max_batch: int = 8
    max_prompt_chars: int = 1000
    max_body_bytes: int = 24 * 2**20  # whole request body, images included (base64)
    max_queue: int = 256  # jobs queued or running; more gets 429


class JobFinishedError(Exception):
    """Cancelling a job that already ended (done, failed or cancelled)."""

    def __init__(self, job: Job):
        super().__init__(f"job {job.id} is already {job.state}")
        self.job = job


# --- request checks beyond the schema --------------------------------------------------------------


def normalize_image(b64: str, what: str, max_side: int) -> tuple[bytes, str | None]:
    """The uploaded file's bytes (kept as they are, so the manifest's sha256 is ``sha256sum`` of the file)
    and the image format; rejects what is not a readable image of a sane size."""
    try:
        data = image_bytes(b64, what)
    except InvalidRequestError:
        raise InvalidRequestError(f"{what}: not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            size, fmt = probe.size, probe.format
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidRequestError(f"{what}: not a readable image ({e})") from None
    if max(size) > 4 * max_side:
        raise InvalidRequestError(f"{what}: {size[0]}x{size[1]} is too large (at most {4 * max_side} pixels a side)")
    open_image(data, what)  # decodes it fully: a truncated file is refused now, not when the job runs
    return data, fmt


def check_request(req: GenerationRequest, model: ModelBundle, limits: Limits) -> None:
    """This server's limits, then the model's constraints (``generate.check_request``: size divisibility,
    eta support, a mask without an init image, seed overflow); every problem in one line."""
    problems = []
    req = resolve(model, req)  # the model's defaults where the request leaves them unset
    for lora in req.loras:  # named ones must be installed: a 422 now, not a failed job later
        model.adapters.lora_path(lora.name)
    if req.steps > limits.max_steps:
        problems.append(f"steps: at most {limits.max_steps} on this server")
    if req.batch > limits.max_batch:
        problems.append(f"batch: at most {limits.max_batch} on this server")
    for name in ("prompt", "negative_prompt"):
        if len(getattr(req, name)) > limits.max_prompt_chars:
            problems.append(f"{name}: at most {limits.max_prompt_chars} characters on this server")
    for name, side in (("width", req.width or model.sample_size), ("height", req.height or model.sample_size)):
        if side > limits.max_side:
            problems.append(f"{name}: at most {limits.max_side} on this server")
    if not problems:
        try:
            size = check_for_model(model, req)  # the output size: a cascade's or an enlarged input's too
            problems += [f"{name}: the output would be {side}, at most {limits.max_side} on this server"
                         for name, side in zip(("width", "height"), size) if side > limits.max_side]
        except InvalidRequestError as e:
            problems.append(str(e))
    if problems:
        raise InvalidRequestError("; ".join(problems))


# --- how a job is shown ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobView:
    """A job as both faces show it: its row, its live progress, its place in the queue, its images."""

    job: Job
    step: int
    total: int  # 0 while queued or before the first step
    position: int | None  # queued jobs ahead of this one (None unless queued)
    preview: bytes | None  # the running job's latest preview PNG
    images: list[ImageRecord]  # once done

    @property
    def state(self) -> str:
        return self.job.state

    @property
    def request(self) -> dict[str, Any]:
        """The request as run: seed fixed, input images as "sha256:" + the hash of their file bytes (as the
        manifests record them; the base64 itself can be megabytes)."""
        return recorded(dict(self.job.request))


@dataclass(frozen=True)
class JobUpdate:
    """One thing ``Service.follow`` saw change: the job now, and the preview if it is new since the last
    update (None otherwise, so a stream sends each preview once). ``final``: the job ended; the last one."""

    view: JobView
    new_preview: bytes | None
    final: bool


# --- the service -------------------------------------------------------------------------------------


class Service:
    """The store, gallery, model and worker, and what the faces do with them."""

    def __init__(self, model: ModelBundle, data_dir: Path, limits: Limits, preview_every: int,
                 queue: str | RedisQueue | None = None):
        """``queue``: None for the embedded SQLite queue in ``data_dir``; a Redis URL (or a connected
        ``RedisQueue``) for a queue shared with ``dreamlab worker``s on other machines."""
        self.model, self.data_dir, self.limits = model, data_dir, limits
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(data_dir / ".lock", "w")
        except OSError as e:
            raise DreamlabError(f"cannot use {data_dir} for the server's data: {e.strerror or e}") from None
        try:  # one server per data folder: the queue has one worker (released when the process dies)
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise DreamlabError(f"another dreamlab server is using {data_dir}") from None
        self.store: JobStore | RedisJobStore
        if queue is None:
            self.store = JobStore(data_dir / DB_NAME, max_queue=limits.max_queue)
            self.gallery = Gallery(data_dir, self.store)
            self.worker = Worker(model, self.store, self.gallery, preview_every=preview_every)
        else:  # jobs in Redis, run by workers anywhere; redis and dramatiq are imported only then
            from .redis_queue import RedisQueue
            from .redis_store import RedisJobStore
            from .redis_worker import RedisWorker

            queue = RedisQueue(queue) if isinstance(queue, str) else queue
            self.store = RedisJobStore(data_dir, DB_NAME, queue, model, max_queue=limits.max_queue)
            self.gallery = self.store.gallery
            self.worker = RedisWorker(model, queue, preview_every=preview_every)

    def start(self, run_worker: bool) -> None:
        requeued = self.store.requeue_interrupted()
        if requeued:
            log.warning("requeued %d job(s) interrupted by the last shutdown", len(requeued))
        if run_worker:
            self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        self.store.close()
        self._lock_file.close()

    # --- jobs ---

    def submit(self, req: GenerationRequest) -> Job:
        """Check ``req`` against this server and the model, then queue it. Raises InvalidRequestError (or
        another DreamlabError) and QueueFullError."""
        check_request(req, self.model, self.limits)
        data = resolve(self.model, req).model_dump()  # the job records the steps, sampler... it will run with
        if data["seed"] is None:  # fixed now, so a job that restarts makes the same images
            data["seed"] = secrets.randbelow(2**31)
        for holder, key, what in image_fields(data, empty=True):
            raw, fmt = normalize_image(holder[key], what, self.limits.max_side)
            holder[key] = base64.b64encode(raw).decode("ascii")  # canonical: no data: prefix, no line breaks
            self.gallery.record_input(raw, fmt)
        return self.store.submit(data)

    def job(self, job_id: str) -> Job | None:
        return self.store.get(job_id)

    def jobs(self, state: str | None, limit: int, offset: int) -> list[JobView]:
        """Newest first."""
        return [self.view(job) for job in self.store.list_jobs(state, limit, offset)]

    def cancel(self, job_id: str) -> Job | None:
        """A queued job is cancelled at once; a running one stops at its next step. The job after the
        request (None: no such job); JobFinishedError if it had already ended."""
        job = self.store.get(job_id, with_request=False)
        if job is None:
            return None
        if job.state in TERMINAL:
            raise JobFinishedError(job)
        return self.store.cancel(job_id)

    def running(self) -> JobView | None:
        """The job the worker is running now (None while it is idle), without its request."""
        job = self.store.running()
        return self.view(job) if job is not None else None

    def preview(self, job_id: str) -> bytes | None:
        """The running job's latest preview PNG."""
        progress = self.store.progress(job_id)
        return progress.preview if progress is not None else None

    def view(self, job: Job) -> JobView:
        progress = self.store.progress(job.id) if job.state == "running" else None
        return self._view(job, progress, self.store.position(job))

    def _view(self, job: Job, progress: Progress | None, position: int | None) -> JobView:
        if job.state != "running":  # read before the job: it may have ended in between
            progress = None
        images = self.store.images_of(job.id) if job.state == "done" else []
        step = total = 0
        if progress is not None:
            step, total = progress.step, progress.total
        elif images:  # the steps actually walked (img2img walks fewer)
            step = total = len(images[0].record.sigmas) - 1
        return JobView(job=job, step=step, total=total, position=position,
                       preview=progress.preview if progress is not None else None, images=images)

    async def follow(
        self,
        job_id: str,
        *,
        poll: float = 0.05,
        max_seconds: float = MAX_FOLLOW_SECONDS,
        stop: Callable[[], Awaitable[bool]] | None = None,
    ) -> AsyncIterator[JobUpdate]:
        """The job's updates as they happen: one whenever its state, progress or queue position changed
        (the first at once), and the last with ``final`` set once it ended. It ends without a final update
        after ``max_seconds``, when ``stop()`` says so (an HTTP client went away), or if there is no such job.

        Checks every ``poll`` seconds, but reads the job only after the store changed (a job changed state:
        ``store.version``; or this job made progress: its ``Progress.version``), so idle followers cost next
        to nothing (it does the in-memory progress lookup and nothing else)."""
        seen: tuple[int, int] | None = None
        last: tuple | None = None
        sent_preview: bytes | None = None
        deadline = time.monotonic() + max_seconds
        while time.monotonic() < deadline:
            progress = self.store.progress(job_id)
            now = (self.store.version, progress.version if progress else -1)
            if now != seen:
                seen = now
                job = self.store.get(job_id, with_request=False)
                if job is None:
                    return
                position = self.store.position(job)
                if (key := (job.state, now[1], position)) != last:
                    last = key
                    view = self._view(job, progress, position)
                    new_preview = None
                    if view.preview is not None and view.preview is not sent_preview:  # the worker's new bytes
                        sent_preview = new_preview = view.preview
                    final = job.state in TERMINAL
                    yield JobUpdate(view, new_preview, final)
                    if final:
                        return
            if stop is not None and await stop():
                return
            await asyncio.sleep(poll)

    # --- gallery ---

    def search_images(self, query: str, limit: int, offset: int) -> tuple[int, list[ImageRecord]]:
        """How many images match, and a page of them, newest first; ``query``: a substring of the prompt."""
        return self.store.search_images(query, limit, offset)

    def image(self, image_id: str) -> ImageRecord | None:
        return self.store.image(image_id)

    def image_path(self, image: ImageRecord) -> Path | None:
        """The image's PNG (None if the file is gone)."""
        return self.gallery.image_path(image)

    def parameters(self, image: ImageRecord) -> str:
        """The image's A1111-compatible parameters text."""
        from ..metadata import a1111_parameters

        return a1111_parameters(image.record)

    def delete_image(self, image_id: str) -> bool:
        """Delete the image and its file; False if there was no such image."""
        return self.gallery.delete(image_id)

    def input_path(self, sha256: str) -> Path | None:
        """An uploaded input image by the sha256 of its bytes (as its manifests record it)."""
        return self.gallery.input_path(sha256)
