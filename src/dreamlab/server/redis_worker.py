"""A worker of a Redis queue (``dreamlab worker --queue redis://...``, or the API node's own): the model
stays loaded in this process; dramatiq's consumer threads fetch jobs, one at a time, and heartbeat; its one
worker thread runs each job through the embedded worker's ``run_job`` (the same ``generate``, progress,
previews and cancellation checks), and the finished images are handed to the API node as PNG bytes."""

from __future__ import annotations

import logging

import dramatiq
from PIL import Image

from ..manifest import Manifest
from ..metadata import png_bytes
from ..models.bundle import ModelBundle
from .queue import Job
from .redis_queue import ACTOR, POLL_MS, QUEUE, RedisQueue
from .worker import Worker

log = logging.getLogger("dreamlab.server")


class RedisWorker(Worker):
    def __init__(self, model: ModelBundle, queue: RedisQueue, *, preview_every: int = 2):
        super().__init__(model, queue, None, preview_every=preview_every)  # type: ignore[arg-type]
        self.queue = queue
        self._consumer: dramatiq.Worker | None = None

    def start(self) -> None:
        dramatiq.Actor(self._on_message, broker=self.queue.broker, actor_name=ACTOR, queue_name=QUEUE, priority=0,
                       options={})
        self._consumer = dramatiq.Worker(self.queue.broker, queues={QUEUE}, worker_threads=1, worker_timeout=POLL_MS)
        # One message at a time: a prefetched job would wait behind a long one while another worker idles,
        # and would wait out the heartbeat timeout if this worker died.
        self._consumer.queue_prefetch = 1
        self._consumer.start()

    def stop(self, timeout: float = 10.0) -> None:
        """The running job stops at its next step and goes back to the queue (``release``)."""
        self._stop.set()
        if self._consumer is not None:
            self._consumer.stop(timeout=int(timeout * 1000))
            self._consumer = None

    @property
    def alive(self) -> bool:
        return self._consumer is not None and any(t.is_alive() for t in self._consumer.workers)

    def _on_message(self, job_id: str) -> None:
        """dramatiq acks the message when this returns: by then the job's record says what became of it."""
        if self._stop.is_set():  # fetched while stopping: another worker will run it
            self.queue.enqueue_again(job_id)
            return
        job = self.queue.claim(job_id)
        if job is not None:
            self.run_job(job)

    def finish(self, job: Job, images: list[Image.Image], manifests: list[Manifest]) -> None:
        pngs = [png_bytes(image, manifest) for image, manifest in zip(images, manifests, strict=True)]
        if not self.queue.deliver(job.id, pngs, [m.dump() for m in manifests]):
            log.warning("job %s: another worker took it over; this attempt's images are dropped", job.id)
