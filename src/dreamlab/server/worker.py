"""The one worker thread: it owns the model and runs jobs one at a time through ``generate``.

Its ``on_step`` records progress and, every few steps, a small preview of the current x0 estimate
(decoded with the model's space), and raises ``Cancelled`` when the job's cancellation was asked for.
No sampling logic lives here."""

from __future__ import annotations

import io
import logging
import threading
import time

from PIL import Image

from ..core.types import StepInfo
from ..errors import Cancelled, DreamlabError
from ..generate import GenerationRequest, generate
from ..images import on_background, to_pil
from ..manifest import Manifest
from ..models.bundle import ModelBundle
from .gallery import Gallery
from .queue import Job, JobStore

log = logging.getLogger("dreamlab.server")


class _Shutdown(Exception):
    """Raised from on_step when the server stops: the job goes back to the queue."""


class Worker:
    def __init__(
        self,
        model: ModelBundle,
        store: JobStore,
        gallery: Gallery,
        *,
        preview_every: int = 2,
        preview_interval: float = 0.25,
        preview_size: int = 96,
    ):
        self.model, self.store, self.gallery = model, store, gallery
        self.preview_every = preview_every  # steps between previews; 0: none
        self.preview_interval = preview_interval  # and at least this many seconds (a decode is not free)
        self.preview_size = preview_size
        self._last_preview = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dreamlab-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.store.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self.store.claim()
            if job is None:
                self.store.wait_for_work(0.5)
                continue
            self.run_job(job)

    def run_job(self, job: Job) -> None:
        try:
            request = GenerationRequest.model_validate(job.request)
            result = generate(self.model, request, on_step=lambda info: self._on_step(job.id, info))
            images, manifests = zip(*result.gallery_items())
            self.finish(job, list(images), list(manifests))
        except Cancelled:
            self.store.mark_cancelled(job.id)
        except _Shutdown:
            self.store.release(job.id)
        except DreamlabError as e:
            self.store.fail(job.id, str(e))
        except Exception as e:  # a bug or an environment problem: keep serving, record it on the job
            log.exception("job %s failed", job.id)
            self.store.fail(job.id, f"internal error: {type(e).__name__}: {e}")

    def finish(self, job: Job, images: list[Image.Image], manifests: list[Manifest]) -> None:
        """The images go into the gallery and the job ends ``done`` (a worker of a Redis queue hands them
        to the API node instead: ``redis_worker.RedisWorker``)."""
        self.store.complete(job.id, self.gallery.save(job.id, images, manifests))

    def _on_step(self, job_id: str, info: StepInfo) -> None:
        if self.store.cancel_requested(job_id):
            raise Cancelled("cancelled")
        if self._stop.is_set():
            raise _Shutdown()
        step = info.i + 1
        preview = None
        every = self.preview_every
        if every and step < info.total and (step == 1 or step % every == 0):
            if time.monotonic() - self._last_preview >= self.preview_interval:
                preview = self.preview(info)
                self._last_preview = time.monotonic()
        self.store.set_progress(job_id, step, info.total, preview)

    def preview(self, info: StepInfo) -> bytes:
        """The first image's current x0 estimate as a small PNG (composited on white)."""
        image: Image.Image = on_background(to_pil(self.model.space.decode(info.denoised[:1]))[0])
        image.thumbnail((self.preview_size, self.preview_size))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
